//! Finding a server for a client and connecting to it: the backend's
//! balancer gives the order, servers at their `maxconn` are skipped, and
//! when all are full the client waits in the backend's queue for a slot, up
//! to `timeouts.queue`. Each attempt connects from the server's least used
//! source address, bound with `IP_BIND_ADDRESS_NO_PORT` so that each
//! (source address, server) pair gets the whole ephemeral range.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{io::Interest, net::TcpStream};

use super::Shared;
use crate::{
    addr::ClientAddr,
    dataplane::{PreConnect, Prepared},
    kernel::sys,
    observe::counters::Counters,
    servers::{
        BackendRt,
        balance::Candidate,
        server::{PairState, ServerState},
    },
};

/// This worker's share of the source ports, when lb chooses them itself
/// (a frontend joins connections on the packet plane): the workers split
/// the range (the pair's `source_port_range`, else the system's), so no two
/// workers ever try the same port of a pair.
#[derive(Clone, Copy, Debug)]
pub struct PortShare {
    pub worker: u16,
    pub workers: u16,
    /// `net.ipv4.ip_local_port_range`.
    pub system: (u16, u16),
}

impl PortShare {
    /// This worker's part of `range`.
    pub fn of(&self, (lo, hi): (u16, u16)) -> (u16, u16) {
        let span = u32::from(hi - lo) + 1;
        let n = u32::from(self.workers.max(1));
        let w = u32::from(self.worker) % n;
        let start = u32::from(lo) + span * w / n;
        let end = u32::from(lo) + span * (w + 1) / n - 1;
        (start as u16, end.max(start) as u16)
    }
}

/// Ports tried for one pair per connect before the pair counts as full.
const PORT_TRIES: usize = 64;

/// Shortest gap between two "out of source ports" warnings of one backend.
const EXHAUSTION_WARN_EVERY: Duration = Duration::from_secs(5);

/// Why a client got no server.
#[derive(Debug)]
pub enum Reject {
    Unreachable,
    /// Every server is down, draining, disabled or at weight 0.
    NoServerUp,
    NoSourcePort,
    /// lb had no descriptor (or memory) for the server socket.
    LocalResources,
    QueueFull,
    QueueTimeout,
}

/// Leaves the backend queue on drop.
struct QueueTicket<'a>(&'a BackendRt, &'a Counters);

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
        self.1.queued.fetch_sub(1, Relaxed);
    }
}

/// A connected server socket, its server and source pair, and what the data
/// plane prepared for it before the connect.
pub type Connected = (TcpStream, Arc<ServerState>, Arc<PairState>, Option<Prepared>);

pub async fn pick_and_connect(
    be: &BackendRt,
    shared: &Shared,
    client: ClientAddr,
    client_sock: &std::net::TcpStream,
    frontend: u16,
) -> Result<Connected, Reject> {
    let deadline = tokio::time::Instant::now() + shared.queue_timeout;
    let mut ticket: Option<QueueTicket<'_>> = None;
    loop {
        // Registered before looking, so a slot freed meanwhile still wakes us.
        let freed = be.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();

        let servers = be.servers();
        let eligible: Vec<&Arc<ServerState>> = servers.iter().filter(|s| s.eligible()).collect();
        if eligible.is_empty() {
            return Err(Reject::NoServerUp);
        }
        let cands: Vec<Candidate> = eligible
            .iter()
            .map(|s| Candidate { id: s.id, weight: s.weight.load(Relaxed), active: s.active.load(Relaxed) })
            .collect();
        let (mut attempts, mut skipped_full, mut out_of_ports) = (0, false, false);
        for i in be.balancer.order(&cands, client.0.ip()) {
            let server = eligible[i];
            if attempts >= shared.connect_attempts {
                break;
            }
            if !server.try_reserve() {
                skipped_full = true;
                continue;
            }
            match connect_server(server, shared, client, client_sock, frontend).await {
                Ok((s, pair, prepared)) => return Ok((s, server.clone(), pair, prepared)),
                Err(ConnectError::NoPort) => {
                    server.release();
                    server.connect_failures.fetch_add(1, Relaxed);
                    out_of_ports = true;
                }
                Err(ConnectError::Local(e)) => {
                    // lb's own limit, not the server's fault: no attempt
                    // elsewhere would fare better.
                    server.release();
                    warn_local(&e);
                    return Err(Reject::LocalResources);
                }
                Err(ConnectError::Io(e)) => {
                    server.release();
                    server.connect_failures.fetch_add(1, Relaxed);
                    shared.stats.connect_failures.fetch_add(1, Relaxed);
                    attempts += 1;
                    log::debug!("client {client}: connect to {} failed (attempt {attempts}): {e}", server.cfg.addr);
                }
            }
        }
        if skipped_full && attempts < shared.connect_attempts {
            if ticket.is_none() {
                if be.waiting.load(Relaxed) >= u64::from(be.queue) {
                    return Err(Reject::QueueFull);
                }
                be.waiting.fetch_add(1, Relaxed);
                shared.stats.queued.fetch_add(1, Relaxed);
                ticket = Some(QueueTicket(be, &shared.stats));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Reject::QueueTimeout);
            }
            continue;
        }
        return Err(if out_of_ports { Reject::NoSourcePort } else { Reject::Unreachable });
    }
}

/// Warns, at most every few seconds per backend, which servers ran out of
/// source ports on which addresses.
pub fn warn_exhausted(be: &BackendRt) {
    let mut w = be.exhaustion_warn.lock().unwrap_or_else(|e| e.into_inner());
    w.1 += 1;
    if w.0.is_some_and(|t| t.elapsed() < EXHAUSTION_WARN_EVERY) {
        return;
    }
    let full: Vec<String> = be
        .servers()
        .iter()
        .map(|s| {
            let srcs: Vec<String> = s.pairs.iter().map(|p| source_name(p.source)).collect();
            format!("{} on {}", s.cfg.addr, srcs.join(", "))
        })
        .collect();
    log::warn!(
        "backend \"{}\": out of source ports ({} client(s) closed): {}; add addresses to source_pool",
        be.name,
        w.1,
        full.join("; ")
    );
    *w = (Some(Instant::now()), 0);
}

/// Why a connect attempt gave no connection.
enum ConnectError {
    /// Every source address of the server is out of ports.
    NoPort,
    /// No descriptor or memory for the socket (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    Local(io::Error),
    Io(io::Error),
}

/// Warns, at most every few seconds, that clients are reset for lack of
/// descriptors or memory in lb itself.
fn warn_local(e: &io::Error) {
    static EVERY: std::sync::Mutex<crate::observe::Every> = std::sync::Mutex::new(crate::observe::Every::new());
    let n = EVERY.lock().unwrap_or_else(|p| p.into_inner()).hit();
    if let Some(n) = n {
        log::warn!(
            "{n} client(s) reset: no socket for the server: {e}; raise LimitNOFILE (`ulimit -n`), lower maxconn \
             or add workers"
        );
    }
}

/// A socket for `server` from `pair`'s source address, bound to `port`
/// when lb chooses the port itself.
fn socket_for(server: &ServerState, pair: &PairState, shared: &Shared, port: Option<u16>) -> io::Result<Socket> {
    let addr = server.cfg.addr.0;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
    if let Some(port) = port {
        // The kernel's own way to a port (bound at connect, shared with
        // every other socket bound that way, unique per 4-tuple), confined
        // to the one port lb chose: a range of one.
        if let Some(src) = pair.source {
            sys::set_bind_address_no_port(&sock)?;
            sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
        }
        sys::set_local_port_range(&sock, port, port)?;
        sys::set_send_buffer(&sock, shared.send_buffer);
        return Ok(sock);
    }
    if let Some(src) = pair.source {
        sys::set_bind_address_no_port(&sock)?;
        sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    }
    sys::set_send_buffer(&sock, shared.send_buffer);
    if let Some((lo, hi)) = server.port_range {
        sys::set_local_port_range(&sock, lo, hi)?;
    } else if shared.sequential_ports {
        // connect() tries the ports of one parity first; once those are all
        // in use for this (source, server) pair, every connect walks all of
        // them before trying the others (measured from one address: 80,000
        // connects/s below half the range, 700/s above it). Any per-socket
        // range makes the search sequential; the kernel clamps 1-65535 to
        // the system's range. Set on every socket: a worker cannot tell
        // when the pair's half is full from its own share of it (ARCHITECTURE.md).
        let _ = sys::set_local_port_range(&sock, 1, u16::MAX);
    }
    Ok(sock)
}

/// Connects to `server` from its least used source address that has ports left.
async fn connect_server(
    server: &ServerState,
    shared: &Shared,
    client: ClientAddr,
    client_sock: &std::net::TcpStream,
    frontend: u16,
) -> Result<(TcpStream, Arc<PairState>, Option<Prepared>), ConnectError> {
    for pair in server.source_order() {
        // lb's own ports (packet plane): a few of the pair's, in turn; the
        // kernel's choice otherwise (one attempt).
        let own = shared.own_ports.map(|share| share.of(server.port_range.unwrap_or(share.system)));
        let tries = if own.is_some() { PORT_TRIES } else { 1 };
        for _ in 0..tries {
            match attempt(server, &pair, shared, (client, client_sock, frontend), own).await {
                Ok((s, prepared)) => return Ok((s, pair, prepared)),
                // This port (or, with the kernel's choice, every port) of
                // the pair is in use toward this server: connect() says
                // EADDRNOTAVAIL; a bind() that had to pick a port, EADDRINUSE.
                Err(ConnectError::Io(e))
                    if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)) => {}
                Err(ConnectError::NoPort) => break,
                Err(e) => return Err(e),
            }
        }
        log::debug!("{}: no free port from {}", server.cfg.addr, source_name(pair.source));
        pair.mark_full();
    }
    Err(ConnectError::NoPort)
}

/// One connect to `server` from `pair`; from a port lb chooses in `own`
/// (its share of the range), or one the kernel chooses.
///
/// lb's choice, the socket and the `connect()` call are made under the
/// pair's port book: a joined connection books its port and closes its
/// socket under the same lock (see `ConnGuard::joined`), so a port is
/// always held by a socket, or booked, or free, never between the two
/// while a connect takes it.
async fn attempt(
    server: &ServerState,
    pair: &Arc<PairState>,
    shared: &Shared,
    (client, client_sock, frontend): (ClientAddr, &std::net::TcpStream, u16),
    own: Option<(u16, u16)>,
) -> Result<(TcpStream, Option<Prepared>), ConnectError> {
    let timeout = shared.connect_timeout;
    let addr = server.cfg.addr.0;
    let started = {
        let mut book = own.map(|_| pair.ports.lock().unwrap_or_else(|e| e.into_inner()));
        let port = match (&mut book, own) {
            (Some(b), Some(range)) => Some(b.next_free(range).ok_or(ConnectError::NoPort)?),
            _ => None,
        };
        let sock = match socket_for(server, pair, shared, port) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                return Err(ConnectError::Local(e));
            }
            Err(e) => return Err(ConnectError::Io(e)),
            Ok(sock) => sock,
        };
        // Counted from the attempt on, so concurrent connects spread out
        // instead of all picking the same least-used address.
        pair.in_use.fetch_add(1, Relaxed);
        let pre = PreConnect {
            client: client_sock,
            server: &sock,
            client_addr: client.0,
            server_addr: addr,
            source: pair.source,
            frontend,
            backend: server.backend as u16,
        };
        let prepared = shared.dataplane.before_connect(&pre);
        start_connect(&sock, addr).map(|()| (sock, prepared))
    };
    let r = match started {
        Ok((sock, prepared)) => match tokio::time::timeout(timeout, connected(sock)).await {
            Ok(r) => r.map(|s| (s, prepared)),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
        },
        Err(e) => Err(e),
    };
    if r.is_err() {
        pair.in_use.fetch_sub(1, Relaxed);
    }
    r.map_err(ConnectError::Io)
}

/// Starts connecting the non-blocking `sock` to `addr`.
fn start_connect(sock: &Socket, addr: SocketAddr) -> io::Result<()> {
    match sock.connect(&SockAddr::from(addr)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits for the connect [`start_connect`] began. The outcome comes with
/// the socket's first readiness: write space alone means connected, an
/// error or a closed write side means it failed (only then is the reason
/// read), so a success costs no `SO_ERROR` read.
async fn connected(sock: Socket) -> io::Result<TcpStream> {
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        let e = stream.take_error()?;
        return Err(e.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ECONNREFUSED)));
    }
    Ok(stream)
}

fn source_name(s: Option<IpAddr>) -> String {
    s.map_or_else(|| "the kernel-chosen address".into(), |a| a.to_string())
}
