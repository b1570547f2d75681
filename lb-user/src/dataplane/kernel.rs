//! Kernel data plane: eBPF sockmap splice (sk_skb stream verdict).
//!
//! Per connection, six map entries (cookies `c` client, `s` server):
//! `LB_CONN[c]`, `LB_CONN[s]` (records: each names its peer's cookie),
//! `LB_TARGET[c]`, `LB_TARGET[s]` (redirect targets, no program), then
//! `LB_SPLICE[s]`, `LB_SPLICE[c]` (verdict attached). Targets go in first,
//! so a socket is never spliced while its peer is missing.
//!
//! With the `sock_ops` program attached (`lb_setup`), the kernel makes
//! most of them: the client is a target from its accept on; the worker
//! writes both records in one `bpf()` before the server's `connect()`
//! ([`KernelDataplane::before_connect`]); the program makes the server a
//! target and splices it when its handshake completes. The worker reads
//! the server's record to learn that it did (one `bpf()`) and splices the
//! client (one more). Whatever the program could not do, the worker does
//! as without it ([`KernelDataplane::insert`], which also says what a side
//! that closes during the inserts gets). Then both sockets go to the
//! slot's holder ([`super::holder`]), which watches them for their ends;
//! this process closes its own descriptors.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::conn::{ConnTraffic, SETUP_KERNEL, SIDE_CLIENT, SIDE_SERVER};

use super::{
    Dataplane, Kind, PreConnect, SpliceError, Spliced, UserspaceDataplane,
    holder::{link::Link, wire::Held},
    joining::{JoinJob, Packet, hold},
    watcher::Dir,
};
use crate::{
    addr::{ip_of, ip16},
    kernel::{KernelError, flows::FlowMaps, maps::ConnMaps, sys},
    observe::conn::ConnGuard,
    observe::counters::Counters,
};

/// How often the verdict reports a direction's progress to the holder, for
/// a `splice_queue_limit` on the bytes waiting in front of a destination:
/// every quarter of it (a power of two, at least 64 KiB), so the queue is
/// looked at four times before it can reach the limit. 0 (no limit): never.
pub fn event_shift(splice_queue_limit: u64) -> u8 {
    if splice_queue_limit == 0 { 0 } else { (splice_queue_limit / 4).max(64 << 10).ilog2() as u8 }
}

/// The records a worker wrote before a server's `connect()`; dropped before
/// [`KernelDataplane::splice`] takes them (the connect failed, or the
/// client was given up), it removes them.
pub struct Prepared {
    cookies: [u64; 2],
    start_ns: u64,
    maps: Option<Arc<Mutex<ConnMaps>>>,
    /// The server's record, once read after the connect.
    server: Option<Option<ConnTraffic>>,
}

impl Prepared {
    /// Reads the server's record once its `connect()` has returned. If
    /// `lb_setup` spliced the server at `ESTABLISHED` (it also set
    /// `TCP_NODELAY` on it), returns the source address it wrote there,
    /// which saves the caller a `getsockname`; `None` otherwise.
    pub fn kernel_source(&mut self) -> Option<std::net::SocketAddr> {
        let r = self.server_record()?;
        (r.setup == SETUP_KERNEL).then(|| std::net::SocketAddr::new(ip_of(r.source_ip), r.source_port))
    }

    fn server_record(&mut self) -> Option<ConnTraffic> {
        if self.server.is_none() {
            let m = self.maps.as_ref()?;
            self.server = Some(m.lock().unwrap_or_else(|e| e.into_inner()).record(self.cookies[1]));
        }
        self.server.flatten()
    }

    /// The records are the connection's from here on. Returns the cookies,
    /// the start and whether `lb_setup` spliced the server.
    fn keep(mut self) -> ([u64; 2], u64, bool) {
        let spliced = self.server_record().is_some_and(|r| r.setup == SETUP_KERNEL);
        self.maps = None;
        (self.cookies, self.start_ns, spliced)
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("cookies", &self.cookies).finish_non_exhaustive()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(m) = self.maps.take() {
            m.lock().unwrap_or_else(|e| e.into_inner()).forget_records(self.cookies);
        }
    }
}

/// The running kernel data plane of one process.
pub struct KernelDataplane {
    maps: Arc<Mutex<ConnMaps>>,
    /// The `sock_ops` program is attached: records go in before connects.
    kernel_setup: bool,
    link: Arc<Link>,
    /// Serves connections the kernel cannot splice (a side already half-closed).
    fallback: UserspaceDataplane,
    stats: Arc<Counters>,
    worker: u16,
    /// [`ConnTraffic::event_shift`] of every record.
    event_shift: u8,
    /// Failed hand-overs to the holder, for a rate-limited warning.
    hold_failures: Mutex<crate::observe::Every>,
    /// The packet plane, if a frontend joins connections there.
    packet: Option<Arc<Packet>>,
    /// Connections a full map sent to the userspace copy, for a
    /// rate-limited warning.
    maps_full: Mutex<crate::observe::Every>,
    /// Test hook (`LB_TEST_COPY_CLIENT=1`): never splice the client side,
    /// as if every client closed during the inserts, so the tests can run
    /// real traffic through the watcher's userspace copy of that direction.
    copy_client: bool,
}

impl KernelDataplane {
    /// Opens the pinned maps under `pin_path` (the program is attached by
    /// the owner of the object); `worker` tags this process's records, and
    /// `link` is the slot's holder; `packet`: per frontend, whether it joins
    /// its connections on the packet plane.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        pin_path: &Path,
        stats: Arc<Counters>,
        idle: Duration,
        splice_queue_limit: u64,
        worker: u16,
        link: Arc<Link>,
        packet: Vec<bool>,
    ) -> Result<Self, KernelError> {
        let maps = Arc::new(Mutex::new(ConnMaps::open(pin_path)?));
        let kernel_setup = pin_path.join(lb_common::maps::LINK_SETUP).exists();
        let copy_client = std::env::var_os("LB_TEST_COPY_CLIENT").is_some_and(|v| v == "1");
        if copy_client {
            log::warn!("LB_TEST_COPY_CLIENT=1: client bytes are copied in userspace (a test setting)");
        }
        let packet = if packet.contains(&true) && pin_path.join(lb_common::maps::PROG_PACKET).exists() {
            let grace = crate::kernel::grace::Grace::start()
                .map_err(|source| KernelError::Io { what: "starting the grace-period thread".into(), source })?;
            Some(Arc::new(Packet { flows: Mutex::new(FlowMaps::open(pin_path)?), grace, frontends: packet }))
        } else {
            None
        };
        Ok(Self {
            maps,
            packet,
            kernel_setup,
            link,
            hold_failures: Mutex::new(crate::observe::Every::new()),
            maps_full: Mutex::new(crate::observe::Every::new()),
            fallback: UserspaceDataplane::new(idle),
            stats,
            worker,
            event_shift: event_shift(splice_queue_limit),
            copy_client,
        })
    }

    /// The two records; `source` is zero before the connect (the
    /// `sock_ops` program fills it in).
    fn records(
        &self,
        [client, server]: [std::net::SocketAddr; 2],
        source: Option<std::net::SocketAddr>,
        (cookies, backend): ([u64; 2], u16),
        now: u64,
    ) -> [ConnTraffic; 2] {
        let base = ConnTraffic {
            last_active_ns: now,
            start_ns: now,
            client_ip: ip16(client.ip()),
            server_ip: ip16(server.ip()),
            source_ip: source.map_or([0; 16], |s| ip16(s.ip())),
            client_port: client.port(),
            server_port: server.port(),
            source_port: source.map_or(0, |s| s.port()),
            worker: self.worker,
            event_shift: self.event_shift,
            backend,
            ..Default::default()
        };
        [
            ConnTraffic { peer_cookie: cookies[1], side: SIDE_CLIENT, ..base },
            ConnTraffic { peer_cookie: cookies[0], side: SIDE_SERVER, ..base },
        ]
    }

    /// Inserts the six map entries: the records, both redirect targets,
    /// then the server's splice and last the client's. A failure before the
    /// client's splice removes everything again (the verdict has not run on
    /// either socket yet, so no byte has moved) and is an error. The
    /// client's splice alone may fail once the server's is in: the client
    /// closed in between (sockmap takes only established sockets), and its
    /// bytes go to the server through the watcher's userspace copy instead.
    fn insert(&self, s: &Spliced, cookies: [u64; 2], records: [ConnTraffic; 2]) -> Result<Dir, SpliceError> {
        let [cc, sc] = cookies;
        let (client, server) = (s.socks.client(), s.socks.server());
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let r = (|| {
            m.insert_records(cookies, records)?;
            m.insert_target(cc, client)?;
            m.insert_target(sc, server)?;
            m.insert_splice(sc, server)
        })();
        if let Err(e) = r {
            m.forget(cookies);
            return Err(e.into());
        }
        Ok(self.splice_client(&mut m, cc, client))
    }

    /// The last insert: the client's splice (see [`Self::insert`]).
    fn splice_client(&self, m: &mut ConnMaps, cc: u64, client: &std::net::TcpStream) -> Dir {
        if self.copy_client {
            return Dir::User;
        }
        match m.insert_splice(cc, client) {
            Ok(()) => Dir::Kernel,
            Err(e) => {
                // Usually the client closed (only established sockets are
                // taken); a full map is counted and told.
                self.map_full(&e);
                log::debug!("client side copied in userspace: {e}");
                Dir::User
            }
        }
    }

    /// Counts and warns (at most every 5 s) when `e` says a kernel map had
    /// no room (`E2BIG`: full; `ENOMEM`: the kernel had no memory for the
    /// entry or the socket's psock).
    fn map_full(&self, e: &(dyn std::error::Error + 'static)) {
        let mut cause = Some(e);
        let mut full = false;
        while let Some(c) = cause {
            let code = c.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error);
            full |= code == Some(libc::E2BIG) || code == Some(libc::ENOMEM);
            cause = c.source();
        }
        if !full {
            return;
        }
        self.stats.kernel_maps_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(n) = self.maps_full.lock().unwrap_or_else(|e| e.into_inner()).hit() {
            log::warn!(
                "{n} connection(s) copied in userspace instead of spliced: {e} (a kernel map is full: `lb stats` \
                 shows which; raise kernel_memory)"
            );
        }
    }

    /// Hands a connection the kernel cannot take to the userspace copy.
    fn fall_back(&self, conn: Spliced, why: &SpliceError) -> Result<(), SpliceError> {
        self.map_full(why);
        log::debug!("connection served by the userspace copy: {why}");
        self.stats.userspace_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.fallback.splice(conn)
    }
}

impl Dataplane for KernelDataplane {
    fn kind(&self) -> Kind {
        Kind::Kernel
    }

    fn before_connect(&self, c: &PreConnect<'_>) -> Option<Prepared> {
        if let Some(p) = &self.packet
            && p.frontends.get(usize::from(c.frontend)) == Some(&true)
        {
            // The server reads the client's windows after the join: in the
            // client's scale, they need no rounding (see `sys::match_window_scale`).
            if let Err(e) = sys::match_window_scale(c.client, c.server) {
                log::debug!("window scale of a server socket: {e}");
            }
        }
        if !self.kernel_setup {
            return None;
        }
        let cookies = [sys::socket_cookie(c.client).ok()?, sys::socket_cookie(c.server).ok()?];
        let now = sys::monotonic_coarse_ns();
        let source = c.source.map(|ip| std::net::SocketAddr::new(ip, 0));
        let records = self.records([c.client_addr, c.server_addr], source, (cookies, c.backend), now);
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = m.insert_records(cookies, records) {
            // The connection is spliced by userspace's inserts, which will
            // meet the same error and hand it to the userspace copy.
            log::debug!("records before connect: {e}");
            return None;
        }
        Some(Prepared { cookies, start_ns: now, maps: Some(self.maps.clone()), server: None })
    }

    fn splice(&self, mut conn: Spliced) -> Result<(), SpliceError> {
        let a = conn.addrs;
        // What each socket counts as written (`tcpi_bytes_acked` +
        // `SIOCOUTQ`) at the splice, known without asking: the client's
        // socket was accepted (the handshake's final ACK acknowledges
        // nothing it counts), the server's was connected (its SYN counts
        // one), plus what lb wrote itself.
        let written_base = [0, 1 + conn.header];
        // sockmap takes only ESTABLISHED sockets: a side that already sent
        // its FIN (CLOSE_WAIT) fails the inserts below, and the connection
        // goes to the userspace copy.
        // With `lb_setup`, the records went in before the connect, and if it
        // spliced the server only the client's splice is left; otherwise all
        // of `insert`, with the records (completed) again.
        let (cookies, start_ns, kernel_spliced) = match conn.prepared.take() {
            Some(p) => p.keep(),
            None => (
                [
                    sys::socket_cookie(conn.socks.client()).map_err(SpliceError::Cookie)?,
                    sys::socket_cookie(conn.socks.server()).map_err(SpliceError::Cookie)?,
                ],
                sys::monotonic_coarse_ns(),
                false,
            ),
        };
        // The server's bytes may wait in its receive queue only if userspace
        // spliced it (after they could arrive).
        let inserted = if kernel_spliced {
            let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            Ok((self.splice_client(&mut m, cookies[0], conn.socks.client()), false))
        } else {
            let records = self.records([a.client, a.server], Some(a.source), (cookies, conn.route[1]), start_ns);
            self.insert(&conn, cookies, records).map(|d| (d, true))
        };
        let (client_dir, server_queued) = match inserted {
            Ok(d) => d,
            Err(e) => return self.fall_back(conn, &e),
        };
        if client_dir == Dir::User {
            self.stats.userspace_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Bytes that arrived before the sockets were spliced sit in their
        // receive queues; re-arming data-ready runs them through the verdict.
        // A server the kernel spliced at ESTABLISHED has none.
        let client = (client_dir == Dir::Kernel).then(|| conn.socks.client());
        let server = server_queued.then(|| conn.socks.server());
        for s in [client, server].into_iter().flatten() {
            if let Err(e) = sys::set_rcvlowat(s, 1) {
                self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
                return Err(SpliceError::Socket(e));
            }
        }
        let held = Held {
            id: cookies[0],
            cookies,
            written_base,
            client_copied: client_dir == Dir::User,
            frontend: conn.route[0],
            backend: conn.route[1],
            client: a.client,
            source: a.source,
            server: a.server,
            start_ns,
            packet: None,
        };
        let Spliced { socks, mut guard, .. } = conn;
        // The verdict counts the spliced directions' bytes per server.
        guard.kernel_counted([client_dir == Dir::Kernel, true]);
        if client_dir == Dir::Kernel
            && let Some(p) = &self.packet
            && p.frontends.get(usize::from(conn.route[0])) == Some(&true)
        {
            let job = JoinJob {
                packet: p.clone(),
                maps: self.maps.clone(),
                link: self.link.clone(),
                stats: self.stats.clone(),
                header: conn.header,
                slot: self.worker,
            };
            tokio::spawn(job.run(held, guard, socks.take()));
            return Ok(());
        }
        self.hold(held, guard, socks.take(), cookies);
        Ok(())
    }

    fn shutdown(&self) {
        let n = self.link.release_all();
        if n > 0 {
            log::info!("{n} spliced connection(s) stay with the holder");
        }
        self.fallback.shutdown();
    }
}

impl KernelDataplane {
    /// Hands a spliced connection to the holder; if it cannot take it, it
    /// is reset and counted.
    fn hold(&self, held: Held, guard: ConnGuard, socks: [std::net::TcpStream; 2], cookies: [u64; 2]) {
        hold(&self.link, &self.maps, &self.hold_failures, held, guard, socks, cookies);
    }
}

#[cfg(test)]
mod tests {
    use super::event_shift;

    #[test]
    fn events_come_four_times_per_bound() {
        assert_eq!(event_shift(0), 0, "no bound, no events");
        assert_eq!(event_shift(16 << 20), 22, "16 MiB: every 4 MiB");
        assert_eq!(event_shift(1 << 20), 18, "1 MiB: every 256 KiB");
        assert_eq!(event_shift(5 << 20), 20, "5 MiB: every 1 MiB, the power of two below a quarter");
        assert_eq!(event_shift(1 << 30), 28);
    }
}
