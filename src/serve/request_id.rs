//! A request id on every response (`x-request-id`) and in every error body, and on the log lines
//! written while the request runs: a client quotes it, the operator finds the cause in the log,
//! and the cause itself never leaves the server. Ids are ours, never taken from the client.

use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

tokio::task_local! {
    static CURRENT: String;
}

/// A random start per process, then a counter: unique within the process and across restarts.
fn next_id() -> String {
    static BOOT: LazyLock<u64> = LazyLock::new(|| RandomState::new().hash_one(std::process::id()));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{:08x}{:08x}", *BOOT as u32, COUNTER.fetch_add(1, Ordering::Relaxed) as u32)
}

/// The id of the request this task is serving, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

pub async fn assign(req: Request, next: Next) -> Response {
    let id = next_id();
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = CURRENT.scope(id.clone(), next.run(req).instrument(span)).await;
    resp.headers_mut().insert("x-request-id", HeaderValue::from_str(&id).expect("hex is a valid header"));
    resp
}
