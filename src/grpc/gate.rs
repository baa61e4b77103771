//! Admission of new connections: a cap per listener, a cap per peer (one uid on the Unix
//! socket, one IP address on TCP), and how long a connection may take to speak. One party
//! holding its maximum of silent connections leaves the rest of the listener to the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{Activity, Conn, ConnInfo, Peer};
use crate::metrics::Metrics;

/// The limits every connection of one listener lives under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Listener name for logs and metrics ("uds", "tcp").
    pub listener: &'static str,
    pub max_connections: usize,
    /// Connections one peer may hold at once; 0: only `max_connections` applies.
    pub max_per_peer: usize,
    /// A connection must have spoken (TLS handshake, HTTP/2 preface, fast-path hello) by then.
    pub handshake_timeout: Duration,
    /// Close a connection that had no call in flight for this long.
    pub idle_timeout: Option<Duration>,
}

/// Whom the per-peer cap counts: a uid is one party whatever its pids; a TCP peer is its
/// address (its ports are free to pick).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerKey {
    Uid(u32),
    Addr(IpAddr),
    Unknown,
}

impl PeerKey {
    fn of(peer: &Peer) -> Self {
        match peer {
            Peer::Unix { uid, .. } => PeerKey::Uid(*uid),
            Peer::Tcp(a) => PeerKey::Addr(a.ip()),
            Peer::UnixUnknown => PeerKey::Unknown,
        }
    }
}

type Counts = Arc<Mutex<HashMap<PeerKey, usize>>>;

/// One admitted connection's places: under the listener's cap (given back when a fast-path
/// connection moves to its own cap) and under its peer's (held for the connection's life).
pub struct Admission {
    listener: Option<OwnedSemaphorePermit>,
    key: PeerKey,
    counts: Counts,
}

impl Admission {
    /// Leaves the listener's cap (fast-path connections have their own), keeping the peer's.
    pub fn leave_listener_cap(&mut self) {
        self.listener = None;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("peer counts");
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Admits connections of one listener up to its caps.
#[derive(Clone)]
pub struct Gate {
    limits: Limits,
    permits: Arc<Semaphore>,
    per_peer: Counts,
    metrics: Arc<Metrics>,
    /// Set while at the cap, so the warning is logged once per episode, not per connection.
    full: Arc<AtomicBool>,
    /// Peers refused at their own cap, for one warning per burst.
    peer_refusals: Arc<AtomicU64>,
}

impl Gate {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            per_peer: Counts::default(),
            metrics,
            full: Arc::new(AtomicBool::new(false)),
            peer_refusals: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.limits.handshake_timeout
    }

    /// Places for a new connection, or None at its peer's cap or the listener's: the caller
    /// closes the connection at once, so it neither waits in the backlog nor holds an fd.
    pub fn admit(&self, peer: &Peer) -> Option<Admission> {
        let key = PeerKey::of(peer);
        {
            let mut counts = self.per_peer.lock().expect("peer counts");
            let n = counts.entry(key.clone()).or_insert(0);
            if self.limits.max_per_peer > 0 && *n >= self.limits.max_per_peer {
                drop(counts);
                self.metrics.connection_refused_peer(self.limits.listener);
                if self.peer_refusals.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
                    tracing::warn!(
                        listener = self.limits.listener,
                        max_connections_per_peer = self.limits.max_per_peer,
                        %peer,
                        "peer at its connection cap: closing its new connections until some end (server.max_connections_per_peer)"
                    );
                }
                return None;
            }
            *n += 1;
        }
        // From here the slot is the admission's: dropping it (refused below) gives it back.
        let mut admission = Admission {
            listener: None,
            key,
            counts: Arc::clone(&self.per_peer),
        };
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => {
                self.full.store(false, Ordering::Relaxed);
                admission.listener = Some(p);
                Some(admission)
            }
            Err(_) => {
                self.metrics.connection_refused(self.limits.listener);
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        listener = self.limits.listener,
                        max_connections = self.limits.max_connections,
                        %peer,
                        "connection cap reached: closing new connections until some end (server.max_connections)"
                    );
                }
                None
            }
        }
    }

    /// Wraps an admitted connection.
    pub fn wrap<IO>(&self, io: IO, peer: Peer, admission: Admission) -> Conn<IO> {
        let activity = Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        });
        Conn {
            io,
            info: ConnInfo { peer, activity },
            idle: self
                .limits
                .idle_timeout
                .map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            metrics: Arc::clone(&self.metrics),
            listener: self.limits.listener,
            _admission: admission,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per_peer: usize) -> Gate {
        Gate::new(
            Limits {
                listener: "uds",
                max_connections: max,
                max_per_peer: per_peer,
                handshake_timeout: Duration::from_secs(1),
                idle_timeout: None,
            },
            Arc::new(Metrics::new()),
        )
    }

    fn uid(uid: u32) -> Peer {
        Peer::Unix {
            uid,
            gid: uid,
            pid: 1,
        }
    }

    #[test]
    fn one_peer_at_its_cap_leaves_room_for_the_others() {
        let g = gate(6, 3);
        let held: Vec<_> = (0..3).map(|_| g.admit(&uid(65534)).unwrap()).collect();
        assert!(g.admit(&uid(65534)).is_none(), "over its own cap");
        let other: Vec<_> = (0..3).map(|_| g.admit(&uid(0)).unwrap()).collect();
        assert!(g.admit(&uid(1)).is_none(), "the listener's cap still holds");
        drop(held);
        assert!(g.admit(&uid(65534)).is_some(), "its places came back");
        drop(other);
        assert!(g.per_peer.lock().unwrap().len() <= 1);
    }

    #[test]
    fn a_fast_path_connection_keeps_its_peer_place_only() {
        let g = gate(1, 1);
        let mut a = g.admit(&uid(7)).unwrap();
        a.leave_listener_cap();
        assert!(g.admit(&uid(7)).is_none(), "the peer's place is still held");
        assert!(
            g.admit(&uid(8)).is_some(),
            "the listener's place was given back"
        );
    }
}
