//! A server at run time: its configuration, the operator's and the health
//! checks' state, its live counters, and its (source address, server)
//! pairs, the unit of the 4-tuple port space.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use tokio::sync::Notify;

use crate::config::{ServerConfig, SourcePool};

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
    /// Where this worker's port search of the pair stands, and the ports of
    /// its connections joined on the packet plane: no socket holds those,
    /// so the kernel would hand them out again (see [`PortBook`]).
    pub ports: std::sync::Mutex<PortBook>,
}

/// The source ports lb chooses itself for a (source address, server) pair
/// once a frontend joins connections on the packet plane: a joined
/// connection has no socket, so nothing in the kernel stops `connect()`
/// from giving its port to a new connection to the same server, whose
/// packets would then be taken for the joined one's.
#[derive(Debug, Default)]
pub struct PortBook {
    next: u32,
    joined: std::collections::HashSet<u16>,
}

impl PortBook {
    /// The next port of `range` (inclusive) after the last one handed out
    /// that no joined connection has; `None` if all of them have one.
    pub fn next_free(&mut self, (lo, hi): (u16, u16)) -> Option<u16> {
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        for _ in 0..span {
            let port = lo + (self.next % span) as u16;
            self.next = self.next.wrapping_add(1);
            if !self.joined.contains(&port) {
                return Some(port);
            }
        }
        None
    }
    /// `port` belongs to a joined connection from now on.
    pub fn join(&mut self, port: u16) {
        self.joined.insert(port);
    }
    /// The joined connection on `port` ended.
    pub fn release(&mut self, port: u16) {
        self.joined.remove(&port);
    }
    /// Ports of joined connections.
    pub fn joined(&self) -> usize {
        self.joined.len()
    }
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
            ports: Default::default(),
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
    pub(crate) fn release(&self) {
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

/// A server at run time.
#[derive(Debug)]
pub struct ServerState {
    /// Stable identity, a hash of the address: the same in every worker and
    /// after the server is removed and added again; balancers key by it.
    pub id: u64,
    pub backend: usize,
    pub cfg: ServerConfig,
    pub weight: AtomicU32,
    admin: AtomicU8,
    /// Health: true unless checks say otherwise.
    pub up: AtomicBool,
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
    pub fn new(backend: usize, cfg: ServerConfig, pool: &SourcePool, slot_freed: Arc<Notify>) -> Self {
        let v4 = cfg.addr.0.is_ipv4();
        let mut pairs: Vec<_> =
            pool.addrs.iter().filter(|a| a.is_ipv4() == v4).map(|a| Arc::new(PairState::new(Some(*a)))).collect();
        if pairs.is_empty() {
            pairs.push(Arc::new(PairState::new(None)));
        }
        Self {
            id: super::balance::identity(cfg.addr),
            backend,
            cfg,
            weight: AtomicU32::new(cfg.weight),
            admin: AtomicU8::new(0),
            up: AtomicBool::new(true),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr::ServerAddr, config::SourcePool};

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
