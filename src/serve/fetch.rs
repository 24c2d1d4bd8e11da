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

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback() || v6.is_unspecified() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
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
        if !self.allow_private && is_private(addr.ip()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_url",
                format!("{host} resolves to a private address; start serve with --allow-private-urls to allow it"),
            ));
        }
        let client = reqwest::Client::builder()
            .resolve(&host, addr)
            .redirect(reqwest::redirect::Policy::none())
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
    fn private_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
