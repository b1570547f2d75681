//! Listening and accepting: the frontends' sockets, the loop that takes a
//! client when the global and frontend `maxconn` allow it, and [`handle`],
//! which sees each client through: a server and a connection to it, then
//! the data plane, or a reset if lb must give up.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt as _,
    io::unix::AsyncFd,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    Shared,
    connect::{Reject, pick_and_connect, warn_exhausted},
};
use crate::{
    addr::ClientAddr,
    config::{FrontendConfig, SniRoutes},
    dataplane::{ConnAddrs, Prepared, Socks, Spliced},
    kernel::sys,
    observe::{
        Backoff,
        conn::{CloseReason, ConnGuard},
    },
    sni::{self, Hello},
};

/// Listen backlog for frontends (`LB_TARGET` has room for the clients it holds).
use crate::config::memory::BACKLOG;

/// Binds a frontend listener; `reuseport` for workers sharing one address.
pub fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    if reuseport {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

/// Where a frontend's clients go, and what lb waits for before choosing.
#[derive(Debug)]
pub struct Route {
    /// Index of the frontend, in config order.
    pub frontend: usize,
    pub backend: usize,
    /// Close a client silent this long (`first_byte_timeout`).
    pub first_byte: Option<Duration>,
    /// Backends by TLS server name, and the longest wait for the ClientHello.
    pub sni: Option<(SniRoutes, Duration)>,
}

impl Route {
    pub fn of(frontend: usize, f: &FrontendConfig, client_hello: Duration) -> Self {
        Route {
            frontend,
            backend: f.backend,
            first_byte: f.first_byte_timeout,
            sni: f.sni.clone().map(|s| (s, client_hello)),
        }
    }
}

/// Accepts one client, non-blocking and close-on-exec in the same call,
/// without registering it with the runtime: the kernel plane never waits
/// on it (two `epoll_ctl` calls per client saved).
fn accept_one(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use rustix::net::{SocketFlags, acceptfrom_with};
    let (fd, addr) = acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let addr = addr
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or_else(|| io::Error::other("accept gave no peer address"))?;
    Ok((std::net::TcpStream::from(fd), addr))
}

pub async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    route: Arc<Route>,
    global: Arc<Semaphore>,
    frontend: Option<Arc<Semaphore>>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new("frontend accept");
    loop {
        // At maxconn, stop accepting: new clients wait in the listen backlog.
        let mut permits = [None, None];
        if let Some(f) = &frontend {
            let Ok(p) = f.clone().acquire_owned().await else { return };
            permits[0] = Some(p);
        }
        let Ok(p) = global.clone().acquire_owned().await else { return };
        permits[1] = Some(p);
        let accepted = match listener.readable().await {
            Ok(mut ready) => match ready.try_io(|l| accept_one(l.get_ref())) {
                Ok(r) => r,
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        match accepted {
            Ok((client, addr)) => {
                shared.stats.accepted.fetch_add(1, Relaxed);
                shared.in_flight.fetch_add(1, Relaxed);
                tokio::spawn(handle(client, ClientAddr(addr), route.clone(), permits, shared.clone()));
            }
            // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
            Err(e) => backoff.failed(&e).await,
        }
    }
}

async fn handle(
    client: std::net::TcpStream,
    addr: ClientAddr,
    route: Arc<Route>,
    permits: [Option<OwnedSemaphorePermit>; 2],
    shared: Arc<Shared>,
) {
    let _in_flight = InFlight(&shared.in_flight);
    let mut guard = ConnGuard::new(shared.stats.clone(), permits, addr.0, shared.access_log);
    let (client, backend) = if route.first_byte.is_none() && route.sni.is_none() {
        (client, route.backend)
    } else {
        // Waiting on the client needs it registered with the runtime, for
        // that wait only.
        let c = match TcpStream::from_std(client) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("client {addr}: joining the runtime failed: {e}");
                return;
            }
        };
        let Some(backend) = wait_for_client(&c, addr, &route, &shared, &mut guard).await else { return };
        match c.into_std() {
            Ok(c) => (c, backend),
            Err(e) => {
                log::warn!("client {addr}: leaving the runtime failed: {e}");
                return;
            }
        }
    };
    connect_and_splice(client, addr, backend, &route, guard, &shared).await
}

/// What an opt-in frontend waits for before a server is chosen: a first
/// byte (`first_byte_timeout`), the ClientHello (`sni`). `None`: the client
/// was closed or reset and counted.
async fn wait_for_client(
    client: &TcpStream,
    addr: ClientAddr,
    route: &Route,
    shared: &Shared,
    guard: &mut ConnGuard,
) -> Option<usize> {
    if let Some(t) = route.first_byte {
        // Opt-in: no server is chosen (and no slot of it taken) before the
        // client has sent something; a silent client is closed and counted.
        // A byte, an EOF or an error ends the wait (the splice handles the
        // last two as usual); nothing is consumed.
        if tokio::time::timeout(t, client.peek(&mut [0u8; 1])).await.is_err() {
            shared.stats.first_byte_timeouts.fetch_add(1, Relaxed);
            guard.set_reason(CloseReason::Rejected("first_byte_timeout"));
            return None;
        }
    }
    match &route.sni {
        None => Some(route.backend),
        Some((routes, within)) => match by_server_name(client, routes, route.backend, *within).await {
            Ok(b) => Some(b),
            Err(hello) => {
                let (counter, why) = match hello {
                    HelloError::Timeout => (&shared.stats.client_hello_timeouts, "client_hello_timeout"),
                    HelloError::Invalid(e) => {
                        log::debug!("client {addr}: {e}; resetting");
                        (&shared.stats.client_hello_invalid, "client_hello_invalid")
                    }
                };
                counter.fetch_add(1, Relaxed);
                guard.set_reason(CloseReason::Rejected(why));
                reset(&[client]);
                None
            }
        },
    }
}

/// Connects to a server of `backend` and hands the pair to the data plane.
async fn connect_and_splice(
    client: std::net::TcpStream,
    addr: ClientAddr,
    backend: usize,
    route: &Route,
    mut guard: ConnGuard,
    shared: &Shared,
) {
    let be = &shared.backends.list[backend];
    let (mut server, target, pair, mut prepared) =
        match pick_and_connect(be, shared, addr, &client, route.frontend as u16).await {
            Ok(v) => v,
            Err(why) => {
                let stats = &shared.stats;
                stats.rejected.fetch_add(1, Relaxed);
                guard.set_reason(CloseReason::Rejected(match why {
                    Reject::NoSourcePort => "no_source_port",
                    Reject::LocalResources => "local_resources",
                    Reject::QueueFull => "queue_full",
                    Reject::QueueTimeout => "queue_timeout",
                    Reject::NoServerUp => "no_server_up",
                    Reject::Unreachable => "unreachable",
                }));
                match why {
                    Reject::NoSourcePort => {
                        stats.no_source_port.fetch_add(1, Relaxed);
                        warn_exhausted(be);
                    }
                    Reject::QueueFull | Reject::QueueTimeout => {
                        stats.queue_rejected.fetch_add(1, Relaxed);
                    }
                    Reject::NoServerUp => {
                        stats.no_server_up.fetch_add(1, Relaxed);
                    }
                    Reject::LocalResources => {
                        stats.no_local_resources.fetch_add(1, Relaxed);
                    }
                    Reject::Unreachable => {}
                }
                log::debug!("client {addr}: no server of backend \"{}\" ({why:?}); resetting", be.name);
                reset(&[&client]);
                return;
            }
        };
    let target_addr = target.cfg.addr;
    guard.connected(target, pair);
    // Where the kernel spliced the server at ESTABLISHED, its record says
    // where it connected from, and it has TCP_NODELAY already.
    let kernel_source = prepared.as_mut().and_then(Prepared::kernel_source);
    let source = match kernel_source.map_or_else(|| server.local_addr(), Ok) {
        Ok(a) => a,
        Err(e) => {
            log::warn!("client {addr} -> {target_addr}: {e}; both sides reset");
            reset(&[&client, &server]);
            return;
        }
    };
    guard.set_source(source);
    let mut header = 0;
    if let Some(version) = be.send_proxy {
        // One write on a fresh socket, before it joins the data plane: no
        // client byte can overtake it. Counted in the bytes to the server.
        let sent = match client.local_addr() {
            Ok(frontend) => {
                let h = crate::proxy_protocol::header(version, addr.0, frontend);
                server.write_all(&h).await.map(|()| h.len() as u64)
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(n) => {
                header = n;
                guard.add_bytes(n, 0);
            }
            Err(e) => {
                log::warn!("client {addr} -> {target_addr}: writing the PROXY header: {e}; both sides reset");
                reset(&[&client, &server]);
                return;
            }
        }
    }
    let addrs = ConnAddrs { client: addr.0, source, server: target_addr.0 };
    // The client's socket has TCP_NODELAY from its listener.
    if kernel_source.is_none() {
        let _ = server.set_nodelay(true);
    }
    let server = match server.into_std() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("client {addr}: leaving the runtime failed: {e}");
            reset(&[&client]);
            return;
        }
    };
    let route = [route.frontend as u16, backend as u16];
    let conn = Spliced { socks: Socks::new(client, server), guard, addrs, route, header, prepared };
    if let Err(e) = shared.dataplane.splice(conn) {
        log::warn!("client {addr} -> {target_addr}: {e}; both sides reset");
    }
}

/// Counts a client in [`Shared::in_flight`] until `handle` returns.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Makes each socket end with a reset when it is dropped (lb gave up on
/// the connection: a clean EOF would read as a complete reply).
fn reset(socks: &[&dyn std::os::fd::AsFd]) {
    for s in socks {
        let _ = sys::set_linger_zero(s);
    }
}

/// Why no backend could be chosen by server name.
enum HelloError {
    /// No complete ClientHello within `timeouts.client_hello` (or the client
    /// left before sending one).
    Timeout,
    Invalid(&'static str),
}

/// Peeks at the client's first bytes until they are a complete ClientHello
/// (however split), not TLS, or `within` passes, and picks the backend:
/// the one its server name routes to, else `default`. Nothing is consumed.
async fn by_server_name(
    client: &TcpStream,
    routes: &SniRoutes,
    default: usize,
    within: Duration,
) -> Result<usize, HelloError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; sni::MAX_HELLO];
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Err(_) => return Err(HelloError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HelloError::Timeout),
            Ok(Ok(n)) => n,
        };
        match sni::server_name(&buf[..n]) {
            Hello::NotTls => return Ok(default),
            Hello::Complete(name) => return Ok(name.and_then(|n| routes.route(&n)).unwrap_or(default)),
            Hello::Invalid(why) => return Err(HelloError::Invalid(why)),
            // The rest is on its way: peek again once it may have come
            // (peek returns at once while anything is queued).
            Hello::NeedMore => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(HELLO_POLL)).await.is_err() {
                    return Err(HelloError::Timeout);
                }
            }
        }
    }
}

/// How often an incomplete ClientHello is looked at again.
const HELLO_POLL: Duration = Duration::from_millis(5);
