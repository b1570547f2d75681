//! Close watcher for spliced connections.
//!
//! The kernel moves the bytes but does not forward EOF or resets. One thread
//! watches every spliced socket with `EPOLLRDHUP | EPOLLET` (no `EPOLLIN`, so
//! data arriving never wakes userspace) and:
//! - on FIN from one side, waits until every byte that side sent has been
//!   redirected and queued on the peer, then `shutdown(Write)`s the peer;
//! - on a reset or error, closes the peer abortively (RST) and both sockets;
//! - closes both sockets once both directions are finished.

use std::{
    collections::{HashMap, HashSet},
    net::{Shutdown, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{SpliceError, Spliced};
use crate::{
    bpf::ConnMaps,
    stats::{CloseReason, ConnGuard, ProxyStats},
    sys::{self, Epoll, EventFd},
};

const WAKE: u64 = u64::MAX;
/// A half-closed direction whose peer accepts no bytes for this long is reset.
const DRAIN_STALL: Duration = Duration::from_secs(60);
const CLIENT: usize = 0;
/// Buffer of a direction copied in userspace.
const COPY_BUF: usize = 64 * 1024;

struct Drain {
    last_written: u64,
    last_progress: Instant,
}

/// How the bytes one side receives reach the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The eBPF verdict redirects them.
    Kernel,
    /// The watcher reads and writes them (the side could not be spliced).
    User,
}

/// A direction copied by the watcher: non-blocking reads from the source,
/// writes to the destination, both driven by edge-triggered epoll events.
struct Copy {
    buf: Box<[u8]>,
    len: usize,
    off: usize,
    eof: bool,
    bytes: u64,
    /// `CLOCK_MONOTONIC_COARSE` ns of the last byte read.
    last_ns: u64,
}

enum Flow {
    /// Kernel splice; a pending EOF forward once the source sent its FIN.
    Kernel(Option<Drain>),
    User(Box<Copy>),
}

struct Conn {
    /// `[client, server]`.
    socks: [TcpStream; 2],
    cookies: [u64; 2],
    /// `tcp_bytes_written` of each socket just before it was spliced (the
    /// kernel counts the SYN there; lb itself writes nothing).
    written_base: [u64; 2],
    /// FIN received on this side.
    rd_closed: [bool; 2],
    /// We sent FIN (shutdown(Write)) on this side.
    wr_shut: [bool; 2],
    /// The bytes received on each side, on their way to the other.
    flows: [Flow; 2],
    guard: ConnGuard,
}

enum Next {
    Keep,
    /// Both directions finished.
    Close,
    /// This side reset or failed; reset the other.
    Abort(usize),
    /// No byte either way for `timeouts.idle`: close both sides.
    Idle,
}

/// The epoll events a socket of a connection with `dirs` is watched for:
/// its FIN always; its data when the watcher copies what it receives, and
/// write space when the watcher copies to it. Data arriving on a spliced
/// socket never wakes the watcher.
fn interest(side: usize, dirs: [Dir; 2]) -> u32 {
    let mut ev = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
    if dirs[side] == Dir::User {
        ev |= libc::EPOLLIN as u32;
    }
    if dirs[1 - side] == Dir::User {
        ev |= libc::EPOLLOUT as u32;
    }
    ev
}

impl Conn {
    fn on_event(&mut self, side: usize, events: u32, maps: &ConnMaps) -> Next {
        let hup = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if hup {
            let err = sys::take_error(&self.socks[side]).unwrap_or(libc::EIO);
            if err != 0 || events & libc::EPOLLERR as u32 != 0 {
                log::debug!("{} side reset or failed: {}", side_name(side), std::io::Error::from_raw_os_error(err));
                return Next::Abort(side);
            }
        }
        // A copied direction sees its FIN as the end of its reads instead.
        if let Flow::Kernel(drain) = &mut self.flows[side]
            && (hup || events & libc::EPOLLRDHUP as u32 != 0)
            && !self.rd_closed[side]
        {
            self.rd_closed[side] = true;
            *drain = Some(Drain { last_written: 0, last_progress: Instant::now() });
        }
        self.progress(maps)
    }

    /// Moves copied bytes and forwards pending EOFs whose bytes have all
    /// reached the peer.
    fn progress(&mut self, maps: &ConnMaps) -> Next {
        for from in [0, 1] {
            let to = 1 - from;
            let next = match &mut self.flows[from] {
                Flow::User(copy) => pump(copy, &self.socks, from, &mut self.rd_closed, &mut self.wr_shut),
                Flow::Kernel(None) => Next::Keep,
                Flow::Kernel(Some(d)) => {
                    // tcpi_bytes_received counts the FIN, which is in by now.
                    let received = sys::tcp_bytes_received(&self.socks[from]).unwrap_or(1).saturating_sub(1);
                    let redirected = maps.redirected(self.cookies[from]).unwrap_or(0);
                    let written =
                        sys::tcp_bytes_written(&self.socks[to]).unwrap_or(0).saturating_sub(self.written_base[to]);
                    log::trace!(
                        "drain {}: received {received} redirected {redirected} written {written}",
                        side_name(from)
                    );
                    if redirected >= received && written >= redirected {
                        // Errors here mean the peer is already gone; its own event follows.
                        let _ = self.socks[to].shutdown(Shutdown::Write);
                        self.wr_shut[to] = true;
                        self.flows[from] = Flow::Kernel(None);
                        Next::Keep
                    } else if written > d.last_written {
                        d.last_written = written;
                        d.last_progress = Instant::now();
                        Next::Keep
                    } else if d.last_progress.elapsed() > DRAIN_STALL {
                        log::warn!(
                            "{} accepted no bytes for {DRAIN_STALL:?} after the {} closed ({written} of \
                             {redirected} bytes delivered); resetting",
                            side_name(to),
                            side_name(from)
                        );
                        Next::Abort(to)
                    } else {
                        Next::Keep
                    }
                }
            };
            if !matches!(next, Next::Keep) {
                return next;
            }
        }
        if self.rd_closed == [true; 2] && self.wr_shut == [true; 2] { Next::Close } else { Next::Keep }
    }

    /// Whether an EOF forward waits for the kernel to finish delivering.
    fn pending(&self) -> bool {
        self.flows.iter().any(|f| matches!(f, Flow::Kernel(Some(_))))
    }

    /// Bytes moved from each side to the other (client->server, server->client).
    fn bytes(&self, maps: &ConnMaps) -> [u64; 2] {
        [0, 1].map(|side| match &self.flows[side] {
            Flow::User(c) => c.bytes,
            Flow::Kernel(_) => maps.redirected(self.cookies[side]).unwrap_or(0),
        })
    }

    /// Whether no byte moved either way since `now_ns - idle_ns`.
    fn idle(&self, maps: &ConnMaps, now_ns: u64, idle_ns: u64) -> bool {
        let kernel = self.cookies.iter().filter_map(|c| maps.record(*c)).map(|r| r.last_active_ns);
        let copied = self.flows.iter().filter_map(|f| match f {
            Flow::User(c) => Some(c.last_ns),
            Flow::Kernel(_) => None,
        });
        let last = kernel.chain(copied).max();
        last.is_some_and(|l| now_ns.saturating_sub(l) > idle_ns)
    }
}

/// Copies what side `from` received to the other side until either would
/// block; at the source's EOF, once everything is written, forwards it.
fn pump(c: &mut Copy, socks: &[TcpStream; 2], from: usize, rd_closed: &mut [bool; 2], wr_shut: &mut [bool; 2]) -> Next {
    use std::io::{ErrorKind, Read as _, Write as _};
    let to = 1 - from;
    if wr_shut[to] {
        return Next::Keep;
    }
    loop {
        if c.off < c.len {
            match (&socks[to]).write(&c.buf[c.off..c.len]) {
                Ok(n) => c.off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{} side failed while written to: {e}", side_name(to));
                    return Next::Abort(to);
                }
            }
            continue;
        }
        if c.eof {
            let _ = socks[to].shutdown(Shutdown::Write);
            wr_shut[to] = true;
            return Next::Keep;
        }
        match (&socks[from]).read(&mut c.buf) {
            Ok(0) => {
                c.eof = true;
                rd_closed[from] = true;
            }
            Ok(n) => {
                (c.len, c.off) = (n, 0);
                c.bytes += n as u64;
                c.last_ns = sys::monotonic_coarse_ns();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("{} side failed while read: {e}", side_name(from));
                return Next::Abort(from);
            }
        }
    }
}

fn side_name(side: usize) -> &'static str {
    if side == CLIENT { "client" } else { "server" }
}

/// The watcher thread's own state: no other thread touches it.
struct Table {
    conns: HashMap<u64, Conn>,
    /// Connections with a pending EOF forward, polled every millisecond.
    pending: HashSet<u64>,
    /// Events (by epoll key) for connections still on their way from
    /// `watch`, replayed when they arrive.
    early: HashMap<u64, u32>,
}

/// Handed from [`Watcher::watch`] to the watcher thread.
enum Msg {
    Watch(u64, Conn),
    /// Registering the sockets failed: forget events kept for this id.
    Cancel(u64),
}

#[derive(Default)]
struct Inbox {
    msgs: Vec<Msg>,
    /// Set by the thread's last drain; later connections are refused.
    closed: bool,
}

struct Shared {
    epoll: Epoll,
    wake: EventFd,
    /// New connections. `watch` holds this lock only to push, so accepting
    /// never waits for the watcher's map work.
    inbox: Mutex<Inbox>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    stats: Arc<ProxyStats>,
    idle: Duration,
}

pub(super) struct Watcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Watcher {
    /// `maps`: the thread's own handles to the pinned maps.
    pub fn start(maps: ConnMaps, stats: Arc<ProxyStats>, idle: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoll: Epoll::new()?,
            wake: EventFd::new()?,
            inbox: Mutex::new(Inbox::default()),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stats,
            idle,
        });
        shared.epoll.add(shared.wake.raw(), libc::EPOLLIN as u32, WAKE)?;
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("lb-splice-watch".into()).spawn(move || run(&s, maps))?;
        Ok(Self { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Starts watching a spliced connection; from here on it owns both sockets.
    ///
    /// The sockets join the epoll set before the connection reaches the
    /// thread (so nothing can close them while they are being added); an
    /// event that beats the connection there is kept until it arrives.
    /// `dirs`: how the bytes each side receives move (client's, server's).
    pub fn watch(
        &self,
        conn: Spliced,
        cookies: [u64; 2],
        written_base: [u64; 2],
        dirs: [Dir; 2],
    ) -> Result<(), SpliceError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let fds = [conn.socks.client().as_raw_fd(), conn.socks.server().as_raw_fd()];
        for (side, fd) in fds.into_iter().enumerate() {
            if let Err(e) = self.shared.epoll.add(fd, interest(side, dirs), id << 1 | side as u64) {
                if side == 1 {
                    let _ = self.shared.epoll.delete(fds[0]);
                }
                let _ = self.send(Msg::Cancel(id));
                return Err(SpliceError::Socket(e));
            }
        }
        let flows = dirs.map(|d| match d {
            Dir::Kernel => Flow::Kernel(None),
            Dir::User => Flow::User(Box::new(Copy {
                buf: vec![0; COPY_BUF].into_boxed_slice(),
                len: 0,
                off: 0,
                eof: false,
                bytes: 0,
                last_ns: sys::monotonic_coarse_ns(),
            })),
        });
        let conn = Conn {
            socks: conn.socks.take(),
            cookies,
            written_base,
            rd_closed: [false; 2],
            wr_shut: [false; 2],
            flows,
            guard: conn.guard,
        };
        self.send(Msg::Watch(id, conn))
    }

    fn send(&self, m: Msg) -> Result<(), SpliceError> {
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.closed {
            // The thread has stopped: `m` (and the sockets it holds) is dropped here.
            return Err(SpliceError::ShuttingDown);
        }
        inbox.msgs.push(m);
        Ok(())
    }

    /// Closes every connection and ends the thread.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake.notify();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Table {
    /// Takes the connections `watch` queued; `last` refuses any later ones.
    fn receive(&mut self, shared: &Shared, last: bool) {
        let msgs = {
            let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.closed |= last;
            std::mem::take(&mut inbox.msgs)
        };
        for m in msgs {
            match m {
                Msg::Watch(id, conn) => {
                    // A copied side may have had all its bytes before the
                    // watch began: look at it once, as if an event came.
                    for (side, f) in conn.flows.iter().enumerate() {
                        if matches!(f, Flow::User(_)) {
                            *self.early.entry(id << 1 | side as u64).or_default() |= libc::EPOLLIN as u32;
                        }
                    }
                    self.conns.insert(id, conn);
                }
                Msg::Cancel(id) => {
                    self.early.retain(|key, _| key >> 1 != id);
                }
            }
        }
    }
}

/// How often idle connections are looked for: a quarter of the idle
/// timeout, between 50 ms and 10 s.
fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(10))
}

fn run(shared: &Shared, mut maps: ConnMaps) {
    let mut buf = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let sweep_every = sweep_interval(shared.idle);
    let mut next_sweep = Instant::now() + sweep_every;
    let mut t = Table { conns: HashMap::new(), pending: HashSet::new(), early: HashMap::new() };
    loop {
        let timeout = {
            let until_sweep = next_sweep.saturating_duration_since(Instant::now()).as_millis() as i32 + 1;
            if t.pending.is_empty() && t.early.is_empty() { until_sweep } else { 1 }
        };
        let events = match shared.epoll.wait(&mut buf, timeout) {
            Ok(ev) => ev,
            Err(e) => {
                log::error!("close watcher: epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        t.receive(shared, false);
        let arrived: Vec<u64> = t.early.keys().filter(|k| t.conns.contains_key(&(*k >> 1))).copied().collect();
        let replay: Vec<(u64, u32)> = arrived.into_iter().filter_map(|k| t.early.remove_entry(&k)).collect();
        let mut done: Vec<(u64, Next)> = Vec::new();
        for (key, events) in replay.into_iter().chain(events.iter().map(|ev| (ev.u64, ev.events))) {
            if key == WAKE {
                shared.wake.drain();
                continue;
            }
            let (id, side) = (key >> 1, (key & 1) as usize);
            let Some(conn) = t.conns.get_mut(&id) else {
                *t.early.entry(key).or_default() |= events;
                continue;
            };
            match conn.on_event(side, events, &maps) {
                Next::Keep if conn.pending() => {
                    t.pending.insert(id);
                }
                Next::Keep => {}
                next => done.push((id, next)),
            }
        }
        let pending: Vec<u64> = t.pending.iter().copied().collect();
        for id in pending {
            let Some(conn) = t.conns.get_mut(&id) else {
                t.pending.remove(&id);
                continue;
            };
            match conn.progress(&maps) {
                Next::Keep if conn.pending() => {}
                Next::Keep => {
                    t.pending.remove(&id);
                }
                next => done.push((id, next)),
            }
        }
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + sweep_every;
            let now = sys::monotonic_coarse_ns();
            let idle_ns = shared.idle.as_nanos() as u64;
            for (id, conn) in &t.conns {
                if conn.idle(&maps, now, idle_ns) && !done.iter().any(|(d, _)| d == id) {
                    done.push((*id, Next::Idle));
                }
            }
        }
        for (id, next) in done {
            t.pending.remove(&id);
            let Some(conn) = t.conns.remove(&id) else {
                continue;
            };
            let mut conn = conn;
            conn.guard.set_reason(match next {
                Next::Abort(_) => CloseReason::Rst,
                Next::Idle => CloseReason::Idle,
                Next::Keep | Next::Close => CloseReason::Fin,
            });
            match next {
                Next::Abort(side) => {
                    let _ = sys::set_linger_zero(&conn.socks[1 - side]);
                    shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
                }
                Next::Idle => {
                    log::debug!("closing a connection idle for more than {:?}", shared.idle);
                    for s in &conn.socks {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    shared.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                }
                Next::Keep | Next::Close => {}
            }
            close(&mut maps, conn);
        }
        if shared.stopping.load(Ordering::Acquire) {
            t.receive(shared, true);
            t.pending.clear();
            for (_, mut conn) in t.conns.drain() {
                conn.guard.set_reason(CloseReason::Shutdown);
                close(&mut maps, conn);
            }
            return;
        }
    }
}

fn close(maps: &mut ConnMaps, mut conn: Conn) {
    let bytes = conn.bytes(maps);
    conn.guard.add_bytes(bytes[CLIENT], bytes[1 - CLIENT]);
    maps.forget_closing(conn.cookies);
    drop(conn); // closes both sockets, exactly once
}
