//! Process-local counters kept by the proxy, shared by both data planes.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use serde::Serialize;

/// Live and cumulative connection counters of this process.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    /// Clients closed because no server could be reached.
    pub rejected: AtomicU64,
    /// Connect attempts to servers that failed (refused, timed out).
    pub connect_failures: AtomicU64,
    /// Connections ended by a reset forwarded from one side to the other.
    pub aborted: AtomicU64,
    /// Connections the kernel plane handed to the userspace copy because a
    /// side had already half-closed (sockmap only takes established sockets).
    pub userspace_fallbacks: AtomicU64,
    /// Bytes client -> server copied by the userspace data plane.
    pub userspace_bytes_in: AtomicU64,
    /// Bytes server -> client copied by the userspace data plane.
    pub userspace_bytes_out: AtomicU64,
}

/// A plain copy of [`ProxyStats`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProxySnapshot {
    pub accepted: u64,
    pub active: u64,
    pub closed: u64,
    pub rejected: u64,
    pub connect_failures: u64,
    pub aborted: u64,
    pub userspace_fallbacks: u64,
    pub userspace_bytes_in: u64,
    pub userspace_bytes_out: u64,
}

impl ProxyStats {
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            closed: self.closed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            aborted: self.aborted.load(Relaxed),
            userspace_fallbacks: self.userspace_fallbacks.load(Relaxed),
            userspace_bytes_in: self.userspace_bytes_in.load(Relaxed),
            userspace_bytes_out: self.userspace_bytes_out.load(Relaxed),
        }
    }
}

/// Counts one live connection; dropping it marks the connection closed.
#[derive(Debug)]
pub struct ConnGuard {
    stats: Arc<ProxyStats>,
}

impl ConnGuard {
    pub fn new(stats: Arc<ProxyStats>) -> Self {
        stats.active.fetch_add(1, Relaxed);
        Self { stats }
    }
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Relaxed);
        self.stats.closed.fetch_add(1, Relaxed);
    }
}
