//! Kernel data plane: eBPF sockmap splice (sk_skb stream verdict).
//!
//! Per connection, six map entries (cookies `c` client, `s` server):
//! `LB_CONN[c]`, `LB_CONN[s]` (records), `LB_PEER[c] = server`,
//! `LB_PEER[s] = client` (redirect targets, no program), then
//! `LB_SPLICE[c] = client`, `LB_SPLICE[s] = server` (verdict attached).
//! Peers go in first, so a socket is never spliced while its peer is missing.

use std::{
    net::IpAddr,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::{
    conn::{ConnTraffic, SIDE_CLIENT, SIDE_SERVER},
    maps::{CONN, PEER, SPLICE},
};

use super::{Dataplane, Kind, SpliceError, Spliced, UserspaceDataplane, watcher::Watcher};
use crate::{
    bpf::{ConnMaps, KernelError},
    stats::ProxyStats,
    sys,
};

/// The running kernel data plane of one process.
pub struct KernelDataplane {
    maps: Mutex<ConnMaps>,
    watcher: Watcher,
    /// Serves connections the kernel cannot splice (a side already half-closed).
    fallback: UserspaceDataplane,
    stats: Arc<ProxyStats>,
    worker: u16,
}

/// An address as the maps store it: IPv6, IPv4 mapped.
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl KernelDataplane {
    /// Opens the pinned maps under `pin_path` (the program is attached by
    /// the owner of the object); `worker` tags this process's records.
    pub fn open(pin_path: &Path, stats: Arc<ProxyStats>, idle: Duration, worker: u16) -> Result<Self, KernelError> {
        let mut conn = ConnMaps::open(pin_path)?;
        let stale = conn.forget_worker(worker);
        if stale > 0 {
            log::info!("removed {stale} connection records left by the previous worker {worker}");
        }
        let maps = Mutex::new(conn);
        // The watcher has handles of its own: closing never waits for splicing.
        let watcher = Watcher::start(ConnMaps::open(pin_path)?, stats.clone(), idle)
            .map_err(|source| KernelError::Io { what: "starting the close watcher thread".into(), source })?;
        Ok(Self { maps, watcher, fallback: UserspaceDataplane::new(idle), stats, worker })
    }

    fn records(&self, s: &Spliced, cookies: [u64; 2]) -> [ConnTraffic; 2] {
        let (client, server, source) = (s.addrs.client, s.addrs.server, s.addrs.source);
        let now = sys::monotonic_coarse_ns();
        let base = ConnTraffic {
            last_active_ns: now,
            start_ns: now,
            client_ip: ip16(client.ip()),
            server_ip: ip16(server.ip()),
            source_ip: ip16(source.ip()),
            client_port: client.port(),
            server_port: server.port(),
            source_port: source.port(),
            worker: self.worker,
            ..Default::default()
        };
        [
            ConnTraffic { peer_cookie: cookies[1], side: SIDE_CLIENT, ..base },
            ConnTraffic { peer_cookie: cookies[0], side: SIDE_SERVER, ..base },
        ]
    }

    /// Inserts the six map entries. On error, everything inserted is
    /// removed again, and the flag says whether the verdict may already have
    /// moved bytes (an `LB_SPLICE` insert had succeeded).
    fn insert(&self, s: &Spliced, cookies: [u64; 2], records: [ConnTraffic; 2]) -> Result<(), (SpliceError, bool)> {
        let [cc, sc] = cookies;
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let mut spliced = false;
        let r = (|| {
            let ins = |map: &'static str| move |source| SpliceError::MapInsert { map, source };
            m.conn.insert(cc, records[0], 0).map_err(ins(CONN))?;
            m.conn.insert(sc, records[1], 0).map_err(ins(CONN))?;
            m.peer.insert(cc, s.server.as_raw_fd(), 0).map_err(ins(PEER))?;
            m.peer.insert(sc, s.client.as_raw_fd(), 0).map_err(ins(PEER))?;
            m.splice.insert(cc, s.client.as_raw_fd(), 0).map_err(ins(SPLICE))?;
            spliced = true;
            m.splice.insert(sc, s.server.as_raw_fd(), 0).map_err(ins(SPLICE))?;
            Ok(())
        })();
        if let Err(e) = r {
            m.forget(cookies);
            return Err((e, spliced));
        }
        Ok(())
    }

    /// Hands a connection the kernel cannot take to the userspace copy.
    fn fall_back(&self, conn: Spliced, why: &str) -> Result<(), SpliceError> {
        log::debug!("connection served by the userspace copy: {why}");
        self.stats.userspace_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.fallback.splice(conn)
    }
}

impl Dataplane for KernelDataplane {
    fn kind(&self) -> Kind {
        Kind::Kernel
    }

    fn splice(&self, conn: Spliced) -> Result<(), SpliceError> {
        let cookies = [
            sys::socket_cookie(&conn.client).map_err(SpliceError::Cookie)?,
            sys::socket_cookie(&conn.server).map_err(SpliceError::Cookie)?,
        ];
        let mut written_base = [0; 2];
        let mut established = true;
        for (base, s) in written_base.iter_mut().zip([&conn.client, &conn.server]) {
            let (est, written) = sys::tcp_splice_state(s).map_err(SpliceError::Socket)?;
            established &= est;
            *base = written;
        }
        // sockmap takes only ESTABLISHED sockets: a client that already sent
        // its FIN (CLOSE_WAIT) is served by the userspace copy instead.
        if !established {
            return self.fall_back(conn, "a side closed before the splice");
        }
        let records = self.records(&conn, cookies);
        match self.insert(&conn, cookies, records) {
            Ok(()) => {}
            Err((e, false)) => return self.fall_back(conn, &e.to_string()),
            Err((e, true)) => return Err(e),
        }
        // Bytes that arrived before the sockets were spliced sit in their
        // receive queues; re-arming data-ready runs them through the verdict.
        for s in [&conn.client, &conn.server] {
            if let Err(e) = sys::set_rcvlowat(s, 1) {
                self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
                return Err(SpliceError::Socket(e));
            }
        }
        self.watcher.watch(conn, cookies, written_base).inspect_err(|_| {
            self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
        })
    }

    fn shutdown(&self) {
        self.watcher.stop();
        self.fallback.shutdown();
    }
}
