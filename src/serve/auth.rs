//! Bearer-token auth for mutating routes (and search, when asked). The tokens come from files
//! (mounted Secrets) or the environment; without one, protected routes are disabled, not open.
//! Two tokens: the write token admits everything; the read token admits search, count, progress
//! and images only, so the one a page or an app is given cannot upload, delete or drop.

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::core::Redacted;

/// The expected token, kept as its SHA-256 only; replaced when its file changes (`reload`).
#[derive(Clone)]
pub struct Token(Arc<RwLock<Option<[u8; 32]>>>);

impl Token {
    pub fn new(token: Option<Redacted>) -> Self {
        Self(Arc::new(RwLock::new(Self::digest(token))))
    }

    fn digest(token: Option<Redacted>) -> Option<[u8; 32]> {
        token.filter(|t| !t.expose().is_empty()).map(|t| Sha256::digest(t.expose()).into())
    }

    pub fn set(&self, token: Option<Redacted>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Self::digest(token);
    }

    fn expected(&self) -> Option<[u8; 32]> {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `given` is the token, in time that depends on neither where it differs nor its
    /// length: digests of equal length are compared with every byte looked at.
    fn admits(&self, given: &str) -> bool {
        let Some(expected) = self.expected() else { return false };
        let given: [u8; 32] = Sha256::digest(given).into();
        given.iter().zip(expected.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

pub async fn require(State(token): State<Token>, req: Request, next: Next) -> Response {
    match check(&[&token], &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The tokens that admit the read routes: either.
#[derive(Clone)]
pub struct Either {
    pub read: Token,
    pub write: Token,
}

pub async fn require_read(State(tokens): State<Either>, req: Request, next: Next) -> Response {
    match check(&[&tokens.read, &tokens.write], &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Whether the request's bearer token is one of `tokens`.
fn check(tokens: &[&Token], req: &Request) -> Result<(), ApiError> {
    if tokens.iter().all(|t| t.expected().is_none()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "disabled",
            "this route needs a token and none is configured (IMAGEINDEX_TOKEN or --token-file)",
        ));
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "));
    match given {
        // Every token looked at, whichever admits: the time says nothing about which.
        Some(t) if tokens.iter().map(|k| k.admits(t.trim())).fold(false, |a, b| a | b) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token")),
        None => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <token>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_tokens() {
        let token = Token::new(Some(Redacted::new("secret")));
        assert!(token.admits("secret"));
        for wrong in ["secreT", "secret2", "secre", "", "x"] {
            assert!(!token.admits(wrong), "{wrong:?}");
        }
        assert!(!Token::new(None).admits(""), "no token admits nothing");
        assert!(!Token::new(Some(Redacted::new(""))).admits(""), "an empty token is no token");
    }
}
