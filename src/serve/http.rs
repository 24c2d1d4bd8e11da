//! The HTTP server loop: hyper with a timer and a watchdog on every connection, so that a client
//! that sends nothing, never finishes its headers (slowloris) or idles between requests is cut
//! off, and a bound on open connections, so that a flood is turned away at accept instead of
//! growing tasks and buffers without limit. `axum::serve` has none of these. Probes still answer
//! when every slot is taken: a few more connections are let in for `/healthz` and `/readyz`
//! alone, each for one request.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers, from when the connection opens or the
    /// previous response ended: also how long a connection may sit idle, over HTTP/1 or HTTP/2.
    pub header_timeout: Duration,
    /// Connections open at once; beyond it, new ones are closed as they are accepted (but for
    /// `PROBE_CONNECTIONS` more that may ask for a probe).
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { header_timeout: Duration::from_secs(10), max_connections: 1024 }
    }
}

/// Connections beyond `max_connections` that are served one request each, and only if it is a
/// probe (a kubelet's, a load balancer's): a full server still says it is alive and ready.
pub const PROBE_CONNECTIONS: usize = 16;

/// The probe connections' own deadline for their one request: short, since they are all an
/// attacker could take while the slots are full.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Time a closing connection (idle, or the server shutting down) has to finish what is in flight.
const CLOSING_GRACE: Duration = Duration::from_secs(30);

/// What one connection is doing, for its watchdog: requests in flight, whether any began, and
/// when the last one began or ended (or the connection opened).
struct Activity(Mutex<ActivityState>);

struct ActivityState {
    in_flight: usize,
    served: bool,
    last: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(ActivityState { in_flight: 0, served: false, last: Instant::now() })))
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut s = self.0.lock().expect("activity lock");
        (s.in_flight, s.served, s.last) = (s.in_flight + 1, true, Instant::now());
        InFlight(self.clone())
    }

    /// Whether the connection has waited longer than it may for its next request: `first` before
    /// its first one, `between` after a response (`None`: one request only).
    fn overdue(&self, first: Duration, between: Option<Duration>) -> bool {
        let s = self.0.lock().expect("activity lock");
        match (s.in_flight, s.served, between) {
            (0, false, _) => s.last.elapsed() >= first,
            (0, true, Some(idle)) => s.last.elapsed() >= idle,
            (0, true, None) => true,
            _ => false,
        }
    }
}

/// A request in flight; its end is activity too.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.0.lock().expect("activity lock");
        (s.in_flight, s.last) = (s.in_flight - 1, Instant::now());
    }
}

/// The app, counted in `activity`; on a probe connection, anything but a probe is a 503.
#[derive(Clone)]
struct Watched {
    app: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    probes_only: bool,
}

impl Service<Request<Incoming>> for Watched {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        if self.probes_only && !matches!(req.uri().path(), "/healthz" | "/readyz") {
            return Box::pin(async move {
                let _in_flight = in_flight;
                Ok(Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .header(header::RETRY_AFTER, "1")
                    .header(header::CONNECTION, "close")
                    .body(Body::from("too many connections open; try again\n"))
                    .expect("a valid response"))
            });
        }
        let answer = self.app.call(req);
        Box::pin(async move {
            let response = answer.await;
            drop(in_flight);
            response
        })
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets what is in flight finish
/// (30 s at most).
pub async fn run(listener: TcpListener, app: Router, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) {
    let max = limits.max_connections.max(1);
    let (slots, probe_slots) = (Arc::new(Semaphore::new(max)), Arc::new(Semaphore::new(PROBE_CONNECTIONS)));
    let (stop, stopping) = watch::channel(false);
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    // Pings find peers that vanished without a FIN; the watchdog closes the live but idle ones.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout.max(Duration::from_secs(1))))
        .keep_alive_timeout(limits.header_timeout.max(Duration::from_secs(1)));
    let builder = Arc::new(builder);
    let app = TowerToHyperService::new(app);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (slot, probes_only) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => match probe_slots.clone().try_acquire_owned() {
                Ok(slot) => (slot, true),
                Err(_) => {
                    tracing::warn!(%peer, "{max} connections open, the limit: closing a new one");
                    continue; // dropping the stream closes it
                }
            },
        };
        let activity = Activity::new();
        let service = Watched { app: app.clone(), activity: activity.clone(), probes_only };
        let (builder, stopping) = (builder.clone(), stopping.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (first, between) = match probes_only {
                true => (PROBE_DEADLINE.min(limits.header_timeout), None),
                false => (limits.header_timeout, Some(limits.header_timeout)),
            };
            watch_connection(&builder, stream, service, activity, first, between, stopping).await;
            tracing::trace!(%peer, "connection closed");
        });
    }
    let _ = stop.send(true);
    // Every slot back means every connection has ended.
    let everyone = slots.acquire_many(max as u32);
    if tokio::time::timeout(CLOSING_GRACE, everyone).await.is_err() {
        tracing::warn!("connections still open after {CLOSING_GRACE:?}; stopping");
    }
}

/// Serves one connection, closing it gracefully once it waits too long for a request (see
/// `Activity::overdue`: this also ends a client stuck before its first bytes or its HTTP/2
/// preface, which hyper's header timeout does not cover) or the server stops; one that does
/// not finish within `CLOSING_GRACE` after that is dropped.
async fn watch_connection(
    builder: &Builder<TokioExecutor>,
    stream: TcpStream,
    service: Watched,
    activity: Arc<Activity>,
    first: Duration,
    between: Option<Duration>,
    mut stopping: watch::Receiver<bool>,
) {
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let every = (first.min(between.unwrap_or(first)) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = stopping.changed(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = tick.tick() => match closing {
                None if activity.overdue(first, between) => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                Some(since) if since.elapsed() >= CLOSING_GRACE => return,
                _ => {}
            },
        }
    }
}
