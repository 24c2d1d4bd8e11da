//! Fetching a query image from a URL, without becoming a proxy into the cluster: http(s) only,
//! the host resolved once and refused if private (unless allowed), the connection pinned to that
//! address, no redirects, a size cap and a deadline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};

use super::ApiError;

pub struct UrlFetcher {
    max_bytes: usize,
    allow_private: bool,
}

/// Whether `ip` is a globally routable unicast address: the only kind a query URL may reach.
/// Everything else is refused: private, shared (CGNAT, where some clouds put their metadata
/// service), loopback, link-local, benchmarking, documentation, reserved, multicast, and the
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4), judged by that address.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(a == 0                                   // "this network"
                || a == 10
                || a == 127
                || (a == 100 && (64..128).contains(&b)) // shared address space, 100.64.0.0/10
                || (a == 169 && b == 254)
                || (a == 172 && (16..32).contains(&b))
                || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
                || (a == 192 && b == 0 && c == 2)      // TEST-NET-1
                || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
                || (a == 192 && b == 168)
                || (a == 198 && (18..20).contains(&b)) // benchmarking, 198.18.0.0/15
                || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
                || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
                || a >= 224) // multicast, reserved 240.0.0.0/4, broadcast
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
            match s {
                // IPv4-mapped ::ffff:a.b.c.d and NAT64 64:ff9b::a.b.c.d: as the IPv4 address.
                [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => is_global(embedded(hi, lo)),
                // 6to4 2002:a.b.c.d::/48: as the IPv4 address.
                [0x2002, hi, lo, ..] => is_global(embedded(hi, lo)),
                // Unspecified, loopback and IPv4-compatible ::a.b.c.d (deprecated): all of ::/96.
                [0, 0, 0, 0, 0, 0, _, _] => false,
                [first, second, ..] => {
                    !((first & 0xfe00) == 0xfc00              // unique local fc00::/7
                        || (first & 0xffc0) == 0xfe80         // link-local fe80::/10
                        || (first & 0xffc0) == 0xfec0         // site-local fec0::/10 (deprecated)
                        || (first & 0xff00) == 0xff00         // multicast
                        || (first == 0x64 && second == 0xff9b) // local-use NAT64 64:ff9b:1::/48
                        || (first == 0x100 && s[1..4] == [0, 0, 0]) // discard-only 100::/64
                        || (first == 0x2001 && second < 0x200) // IETF assignments 2001::/23 (Teredo, ...)
                        || (first == 0x2001 && second == 0xdb8) // documentation
                        || (first & 0xfff0) == 0x3ff0) // documentation 3fff::/20
                }
            }
        }
    }
}

impl UrlFetcher {
    pub fn new(max_bytes: usize, allow_private: bool) -> Self {
        crate::install_crypto(); // the clients it builds take the process's TLS provider
        Self { max_bytes, allow_private }
    }

    pub async fn fetch(&self, raw: &str) -> Result<Bytes, ApiError> {
        let url = url::Url::parse(raw).map_err(|e| ApiError::bad_request(format!("bad url {raw:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ApiError::bad_request("only http and https URLs are fetched"));
        }
        let host = url.host_str().ok_or_else(|| ApiError::bad_request("url has no host"))?.to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let addr: SocketAddr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| ApiError::bad_request(format!("{host} has no address")))?;
        if !self.allow_private && !is_global(addr.ip()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_url",
                format!("{host} resolves to a private address; start serve with --allow-private-urls to allow it"),
            ));
        }
        let client = reqwest::Client::builder()
            .resolve(&host, addr)
            .redirect(reqwest::redirect::Policy::none())
            // HTTP(S)_PROXY would send the request to the proxy, which resolves the host itself.
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(ApiError::internal)?;
        let unreachable = |e: reqwest::Error| ApiError::bad_request(format!("could not fetch {raw}: {e}"));
        let mut resp = client.get(url).send().await.map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(ApiError::bad_request(format!("fetching {raw} returned HTTP {}", resp.status())));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("{raw} is larger than {} bytes", self.max_bytes),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_addresses_pass() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200", // a cloud metadata service, in the shared 100.64.0.0/10
            "100.64.0.1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "203.0.113.9",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",         // IPv4-compatible
            "::8.8.8.8",          // IPv4-compatible, deprecated whatever it holds
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b:1::1",       // local-use NAT64
            "2002:7f00:1::1",     // 6to4 of 127.0.0.1
            "2001:db8::1",
            "2001::1", // Teredo
            "100::1",
        ] {
            assert!(!is_global(ip.parse().unwrap()), "{ip} passed");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(is_global(ip.parse().unwrap()), "{ip} refused");
        }
    }

    /// HTTP_PROXY must not reroute a fetch: the proxy would resolve the host itself, past the check.
    #[tokio::test]
    async fn proxies_in_the_environment_are_ignored() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let serve = |body: &'static [u8]| async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body).await;
                }
            });
            addr
        };
        let (target, proxy) = (serve(b"from the target").await, serve(b"from the proxy").await);
        // The only test in this binary that makes HTTP requests through reqwest.
        unsafe { std::env::set_var("HTTP_PROXY", format!("http://{proxy}")) };
        let got = UrlFetcher::new(1 << 20, true).fetch(&format!("http://{target}/x.jpg")).await;
        unsafe { std::env::remove_var("HTTP_PROXY") };
        assert_eq!(got.unwrap().as_ref(), b"from the target");
    }
}
