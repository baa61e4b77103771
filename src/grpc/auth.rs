//! Who may call the daemon's service: a bearer token on TCP, peer credentials on the Unix socket.
//!
//! Health and reflection stay open (probes and grpcurl's `list` need no secret); every
//! `offloadd.v1.Offload` method is checked. On the Unix socket the file mode (0660) is the
//! first fence; `server.allowed_uids` / `allowed_gids` narrow it further by SO_PEERCRED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tower::{Layer, Service};

use super::conn::{ConnInfo, Peer};
use crate::metrics::Metrics;

/// Path prefix of the methods that need credentials.
const PROTECTED: &str = "/offloadd.v1.Offload/";

/// What callers must show. Built once at startup from the configuration.
#[derive(Debug, Default)]
pub struct AuthPolicy {
    /// Bearer token TCP callers send as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Unix-socket peers allowed by uid or gid; both empty: anyone who can open the socket.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
}

impl AuthPolicy {
    /// Checks a call's peer and metadata.
    pub fn check(&self, peer: &Peer, headers: &http::HeaderMap) -> Result<(), Status> {
        match peer {
            Peer::Tcp(_) => self.check_token(headers),
            _ => self.check_unix_peer(peer),
        }
    }

    fn check_token(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(()); // loopback, or server.tcp_insecure (validated at startup)
        };
        let sent = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match sent {
            Some(s) if constant_time_eq(s.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "wrong bearer token: send the token in server.auth_token_file as metadata `authorization: Bearer <token>`",
            )),
            None => Err(Status::unauthenticated(
                "this TCP listener needs a bearer token: send metadata `authorization: Bearer <token>` (the token is in the daemon's server.auth_token_file), or use the Unix socket",
            )),
        }
    }

    /// The Unix-socket check, shared with the onload fast path.
    pub fn check_unix_peer(&self, peer: &Peer) -> Result<(), Status> {
        if self.allowed_uids.is_empty() && self.allowed_gids.is_empty() {
            return Ok(());
        }
        match peer {
            Peer::Unix { uid, gid, .. }
                if self.allowed_uids.contains(uid) || self.allowed_gids.contains(gid) =>
            {
                Ok(())
            }
            _ => Err(Status::permission_denied(format!(
                "{peer} may not call offloadd: add the uid to server.allowed_uids or the gid to server.allowed_gids (now {:?} / {:?})",
                self.allowed_uids, self.allowed_gids
            ))),
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tower layer that refuses calls the policy does not allow, before they reach a handler.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    pub policy: Arc<AuthPolicy>,
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            policy: Arc::clone(&self.policy),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with(PROTECTED) {
            // Every connection comes through conn::Gate; one without its info is refused.
            let verdict = match req.extensions().get::<ConnInfo>() {
                Some(info) => self.policy.check(&info.peer, req.headers()).inspect_err(|s| {
                    let listener = if matches!(info.peer, Peer::Tcp(_)) { "tcp" } else { "uds" };
                    self.metrics.auth_denied(listener);
                    tracing::warn!(peer = %info.peer, method = req.uri().path(), error = s.message(), "call refused");
                }),
                None => Err(Status::internal("connection without peer information")),
            };
            if let Err(status) = verdict {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn tcp_needs_the_exact_token_when_one_is_set() {
        let tcp = Peer::Tcp("127.0.0.1:1".parse().unwrap());
        let open = AuthPolicy::default();
        assert!(open.check(&tcp, &http::HeaderMap::new()).is_ok());
        let p = AuthPolicy {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(p.check(&tcp, &bearer("Bearer s3cret")).is_ok());
        for bad in [
            http::HeaderMap::new(),
            bearer("Bearer s3cre"),
            bearer("Bearer s3cret2"),
            bearer("s3cret"),
        ] {
            let e = p.check(&tcp, &bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(!e.message().contains("s3cret"), "never echo the token");
        }
        // The token guards TCP; the Unix socket is guarded by its mode and peer credentials.
        let me = Peer::Unix {
            uid: 5,
            gid: 6,
            pid: 7,
        };
        assert!(p.check(&me, &http::HeaderMap::new()).is_ok());
    }

    #[test]
    fn unix_peers_are_allowed_by_uid_or_gid() {
        let p = AuthPolicy {
            allowed_uids: vec![1000],
            allowed_gids: vec![2000],
            ..Default::default()
        };
        let peer = |uid, gid| Peer::Unix { uid, gid, pid: 1 };
        assert!(p.check_unix_peer(&peer(1000, 1)).is_ok());
        assert!(p.check_unix_peer(&peer(1, 2000)).is_ok());
        let e = p.check_unix_peer(&peer(1, 1)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("uid=1"), "{}", e.message());
        assert!(p.check_unix_peer(&Peer::UnixUnknown).is_err());
    }
}
