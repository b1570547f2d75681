//! Counters kept by the proxy: per process, per server and per (source
//! address, server) pair. `publish` copies them into the pinned maps.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::config::ServerConfig;

/// Live and cumulative connection counters of this process.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    /// Clients closed without a server (any reason below, or none reachable).
    pub rejected: AtomicU64,
    /// Of `rejected`: every source address of every tried server was out of ports.
    pub no_source_port: AtomicU64,
    /// Of `rejected`: the backend queue was full or `timeouts.queue` passed.
    pub queue_rejected: AtomicU64,
    /// Connect attempts to servers that failed (refused, timed out).
    pub connect_failures: AtomicU64,
    /// Connections ended by a reset forwarded from one side to the other.
    pub aborted: AtomicU64,
    /// Connections closed because neither side sent a byte for `timeouts.idle`.
    pub idle_closed: AtomicU64,
    /// Clients waiting now for a server slot.
    pub queued: AtomicU64,
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
    pub no_source_port: u64,
    pub queue_rejected: u64,
    pub connect_failures: u64,
    pub aborted: u64,
    pub idle_closed: u64,
    pub queued: u64,
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
            no_source_port: self.no_source_port.load(Relaxed),
            queue_rejected: self.queue_rejected.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            aborted: self.aborted.load(Relaxed),
            idle_closed: self.idle_closed.load(Relaxed),
            queued: self.queued.load(Relaxed),
            userspace_fallbacks: self.userspace_fallbacks.load(Relaxed),
            userspace_bytes_in: self.userspace_bytes_in.load(Relaxed),
            userspace_bytes_out: self.userspace_bytes_out.load(Relaxed),
        }
    }
}

/// One (source address, server) pair: the unit of the 4-tuple port space.
#[derive(Debug)]
pub struct PairState {
    /// `None`: no pool, the kernel picks the source address.
    pub source: Option<IpAddr>,
    pub in_use: AtomicU64,
    pub connects: AtomicU64,
    pub exhausted: AtomicU64,
    /// Milliseconds since `epoch` until which the pair counts as full; 0: not full.
    full_until_ms: AtomicU64,
    epoch: Instant,
}

/// How long a pair that reported EADDRNOTAVAIL is skipped, unless one of
/// its connections closes first.
const FULL_BACKOFF_MS: u64 = 1000;

impl PairState {
    pub fn new(source: Option<IpAddr>) -> Self {
        Self {
            source,
            in_use: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            full_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
    pub fn is_full(&self) -> bool {
        let until = self.full_until_ms.load(Relaxed);
        until != 0 && self.now_ms() < until
    }
    pub fn mark_full(&self) {
        self.exhausted.fetch_add(1, Relaxed);
        self.full_until_ms.store(self.now_ms() + FULL_BACKOFF_MS, Relaxed);
    }
    /// A connection of this pair closed: one port is free again.
    fn release(&self) {
        self.in_use.fetch_sub(1, Relaxed);
        self.full_until_ms.store(0, Relaxed);
    }
}

/// A server at run time.
#[derive(Debug)]
pub struct ServerState {
    pub backend: usize,
    pub cfg: ServerConfig,
    /// One per pool address of the server's family (one `None` pair without a pool).
    pub pairs: Vec<Arc<PairState>>,
    pub port_range: Option<(u16, u16)>,
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Notified whenever a slot of a server of the same backend frees up.
    pub slot_freed: Arc<Notify>,
    /// Round-robin start among equally used pairs.
    cursor: AtomicU64,
}

impl ServerState {
    pub fn new(backend: usize, cfg: ServerConfig, pool: &crate::config::SourcePool, slot_freed: Arc<Notify>) -> Self {
        let v4 = cfg.addr.0.is_ipv4();
        let mut pairs: Vec<_> =
            pool.addrs.iter().filter(|a| a.is_ipv4() == v4).map(|a| Arc::new(PairState::new(Some(*a)))).collect();
        if pairs.is_empty() {
            pairs.push(Arc::new(PairState::new(None)));
        }
        Self {
            backend,
            cfg,
            pairs,
            port_range: pool.port_range,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slot_freed,
            cursor: AtomicU64::new(0),
        }
    }

    /// Takes a connection slot unless the server is at its `maxconn`.
    pub fn try_reserve(&self) -> bool {
        match self.cfg.maxconn {
            None => {
                self.active.fetch_add(1, Relaxed);
                true
            }
            Some(max) => self.active.fetch_update(Relaxed, Relaxed, |a| (a < u64::from(max)).then_some(a + 1)).is_ok(),
        }
    }

    /// Gives back a slot taken by [`Self::try_reserve`].
    pub fn release(&self) {
        self.active.fetch_sub(1, Relaxed);
        self.slot_freed.notify_waiters();
    }

    /// Pairs to try, least used first; ties rotate; full pairs left out.
    pub fn source_order(&self) -> Vec<Arc<PairState>> {
        let n = self.pairs.len();
        let start = self.cursor.fetch_add(1, Relaxed) as usize % n;
        let mut v: Vec<_> = (0..n).map(|i| &self.pairs[(start + i) % n]).filter(|p| !p.is_full()).cloned().collect();
        // Stable: among equal counts the rotated order stays.
        v.sort_by_key(|p| p.in_use.load(Relaxed));
        v
    }
}

/// Counts one live connection; dropping it marks the connection closed and
/// frees its server slot, source port and limit permits.
#[derive(Debug)]
pub struct ConnGuard {
    stats: Arc<ProxyStats>,
    server: Option<(Arc<ServerState>, Arc<PairState>)>,
    _permits: Vec<OwnedSemaphorePermit>,
}

impl ConnGuard {
    pub fn new(stats: Arc<ProxyStats>, permits: Vec<OwnedSemaphorePermit>) -> Self {
        stats.active.fetch_add(1, Relaxed);
        Self { stats, server: None, _permits: permits }
    }
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
    /// The connection now holds a slot of `server` and a port of `pair`
    /// (both already counted when they were reserved).
    pub fn connected(&mut self, server: Arc<ServerState>, pair: Arc<PairState>) {
        server.total.fetch_add(1, Relaxed);
        pair.connects.fetch_add(1, Relaxed);
        self.server = Some((server, pair));
    }
    /// Bytes moved by a connection that is ending (client->server, server->client).
    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        if let Some((s, _)) = &self.server {
            s.bytes_in.fetch_add(bytes_in, Relaxed);
            s.bytes_out.fetch_add(bytes_out, Relaxed);
        }
    }
    pub fn server(&self) -> Option<&ServerState> {
        self.server.as_ref().map(|(s, _)| &**s)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some((server, pair)) = self.server.take() {
            pair.release();
            server.release();
        }
        self.stats.active.fetch_sub(1, Relaxed);
        self.stats.closed.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::ServerAddr, config::SourcePool};

    fn server(pool: &[&str], maxconn: Option<u32>) -> ServerState {
        let pool = SourcePool { addrs: pool.iter().map(|a| a.parse().unwrap()).collect(), port_range: None };
        let cfg = ServerConfig { addr: ServerAddr("127.0.0.1:9".parse().unwrap()), maxconn };
        ServerState::new(0, cfg, &pool, Arc::new(Notify::new()))
    }

    #[test]
    fn least_used_source_first_and_ties_rotate() {
        let s = server(&["127.0.1.1", "127.0.1.2", "127.0.1.3"], None);
        s.pairs[0].in_use.store(5, Relaxed);
        s.pairs[2].in_use.store(1, Relaxed);
        assert_eq!(s.source_order()[0].source, s.pairs[1].source);
        s.pairs[0].in_use.store(0, Relaxed);
        s.pairs[1].in_use.store(0, Relaxed);
        s.pairs[2].in_use.store(0, Relaxed);
        let firsts: Vec<_> = (0..6).map(|_| s.source_order()[0].source).collect();
        for p in &s.pairs {
            assert_eq!(firsts.iter().filter(|f| **f == p.source).count(), 2, "ties must rotate: {firsts:?}");
        }
    }

    #[test]
    fn full_pairs_are_skipped_until_a_port_frees() {
        let s = server(&["127.0.1.1", "127.0.1.2"], None);
        s.pairs[0].in_use.store(1, Relaxed);
        s.pairs[0].mark_full();
        assert!(s.source_order().iter().all(|p| p.source == s.pairs[1].source));
        s.pairs[0].release();
        assert_eq!(s.source_order().len(), 2);
        assert_eq!(s.pairs[0].exhausted.load(Relaxed), 1);
    }

    #[test]
    fn server_maxconn_reserves_exactly() {
        let s = server(&[], Some(2));
        assert_eq!(s.pairs.len(), 1, "no pool: one kernel-chosen pair");
        assert!(s.try_reserve() && s.try_reserve());
        assert!(!s.try_reserve());
        s.release();
        assert!(s.try_reserve());
    }
}
