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
    /// Of `rejected`: no server could take new connections (down, drained, disabled).
    pub no_server_up: AtomicU64,
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
    pub no_server_up: u64,
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
            no_server_up: self.no_server_up.load(Relaxed),
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

/// Operator's state of a server (`lb server enable|drain|disable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Takes new connections (if healthy).
    Enabled,
    /// No new connections; existing ones continue until they end.
    Drain,
    /// No new connections (maintenance); existing ones continue.
    Disabled,
}

/// `state` in stats: what a server does with new connections.
pub const STATE_UP: u32 = 0;
pub const STATE_DOWN: u32 = 1;
pub const STATE_DRAIN: u32 = 2;
pub const STATE_MAINT: u32 = 3;
/// Removed at run time; shown while its connections last.
pub const STATE_REMOVED: u32 = 4;

/// The name of a [`ServerState::state`] code.
pub fn state_name(code: u32) -> &'static str {
    match code {
        STATE_UP => "up",
        STATE_DOWN => "down",
        STATE_DRAIN => "drain",
        STATE_MAINT => "maint",
        _ => "removed",
    }
}

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// A server at run time.
#[derive(Debug)]
pub struct ServerState {
    /// Unique in this process; the balancers key their state by it.
    pub id: u64,
    pub backend: usize,
    pub cfg: ServerConfig,
    pub weight: std::sync::atomic::AtomicU32,
    admin: std::sync::atomic::AtomicU8,
    /// Health: true unless checks say otherwise.
    pub up: std::sync::atomic::AtomicBool,
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
            id: NEXT_SERVER_ID.fetch_add(1, Relaxed),
            backend,
            cfg,
            weight: std::sync::atomic::AtomicU32::new(cfg.weight),
            admin: std::sync::atomic::AtomicU8::new(0),
            up: std::sync::atomic::AtomicBool::new(true),
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

    pub fn admin(&self) -> Admin {
        match self.admin.load(Relaxed) {
            0 => Admin::Enabled,
            1 => Admin::Drain,
            _ => Admin::Disabled,
        }
    }
    pub fn set_admin(&self, a: Admin) {
        self.admin.store(
            match a {
                Admin::Enabled => 0,
                Admin::Drain => 1,
                Admin::Disabled => 2,
            },
            Relaxed,
        );
        // Waiters re-check which servers they may use.
        self.slot_freed.notify_waiters();
    }
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
        self.slot_freed.notify_waiters();
    }
    /// `state` code for stats (see [`state_name`]).
    pub fn state(&self) -> u32 {
        match self.admin() {
            Admin::Drain => STATE_DRAIN,
            Admin::Disabled => STATE_MAINT,
            Admin::Enabled if !self.up.load(Relaxed) => STATE_DOWN,
            Admin::Enabled => STATE_UP,
        }
    }
    /// May take new connections: enabled, healthy, weight above 0.
    pub fn eligible(&self) -> bool {
        self.state() == STATE_UP && self.weight.load(Relaxed) > 0
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

/// Why a connection ended (the access log's `close=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed normally.
    Fin,
    /// One side reset; the other got a reset.
    Rst,
    /// `timeouts.idle` passed.
    Idle,
    /// lb was stopping.
    Shutdown,
    /// No server: none up, no source port, queue full or timed out, unreachable.
    Rejected(&'static str),
    /// Setting the connection up failed.
    Error,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fin => f.write_str("fin"),
            Self::Rst => f.write_str("rst"),
            Self::Idle => f.write_str("idle"),
            Self::Shutdown => f.write_str("shutdown"),
            Self::Rejected(why) => write!(f, "rejected:{why}"),
            Self::Error => f.write_str("error"),
        }
    }
}

/// Who and what, for the access log.
#[derive(Debug)]
struct AccessInfo {
    client: std::net::SocketAddr,
    source: Option<std::net::SocketAddr>,
    start: Instant,
    bytes: [u64; 2],
    reason: CloseReason,
}

/// Counts one live connection; dropping it marks the connection closed and
/// frees its server slot, source port and limit permits, and writes the
/// access-log line.
#[derive(Debug)]
pub struct ConnGuard {
    stats: Arc<ProxyStats>,
    server: Option<(Arc<ServerState>, Arc<PairState>)>,
    _permits: [Option<OwnedSemaphorePermit>; 2],
    /// Boxed: a connection without an access log carries 8 bytes, not ~120.
    access: Option<Box<AccessInfo>>,
}

impl ConnGuard {
    /// `access_log`: write one line when the connection ends.
    pub fn new(
        stats: Arc<ProxyStats>,
        permits: [Option<OwnedSemaphorePermit>; 2],
        client: std::net::SocketAddr,
        access_log: bool,
    ) -> Self {
        stats.active.fetch_add(1, Relaxed);
        let access = access_log.then(|| {
            Box::new(AccessInfo {
                client,
                source: None,
                start: Instant::now(),
                bytes: [0; 2],
                reason: CloseReason::Error,
            })
        });
        Self { stats, server: None, _permits: permits, access }
    }
    /// Records why the connection ends (the last call wins).
    pub fn set_reason(&mut self, r: CloseReason) {
        if let Some(a) = &mut self.access {
            a.reason = r;
        }
    }
    /// The local address of the server-side socket.
    pub fn set_source(&mut self, source: std::net::SocketAddr) {
        if let Some(a) = &mut self.access {
            a.source = Some(source);
        }
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
    pub fn add_bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        if let Some(a) = &mut self.access {
            a.bytes = [bytes_in, bytes_out];
        }
        if let Some((s, _)) = &self.server {
            s.bytes_in.fetch_add(bytes_in, Relaxed);
            s.bytes_out.fetch_add(bytes_out, Relaxed);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(a) = &self.access {
            let server = self.server.as_ref().map_or_else(|| "-".to_owned(), |(s, _)| s.cfg.addr.to_string());
            let source = a.source.map_or_else(|| "-".to_owned(), |s| s.to_string());
            log::info!(
                target: "lb::access",
                "client={} server={server} source={source} duration={:.3}s bytes_in={} bytes_out={} close={}",
                a.client,
                a.start.elapsed().as_secs_f64(),
                a.bytes[0],
                a.bytes[1],
                a.reason
            );
        }
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
        let cfg = ServerConfig { addr: ServerAddr("127.0.0.1:9".parse().unwrap()), maxconn, weight: 1 };
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
