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

struct Drain {
    last_written: u64,
    last_progress: Instant,
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
    /// Pending EOF forward *from* this side to the other.
    drain: [Option<Drain>; 2],
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
        if (hup || events & libc::EPOLLRDHUP as u32 != 0) && !self.rd_closed[side] {
            self.rd_closed[side] = true;
            self.drain[side] = Some(Drain { last_written: 0, last_progress: Instant::now() });
        }
        self.progress(maps)
    }

    /// Forwards pending EOFs whose bytes have all reached the peer.
    fn progress(&mut self, maps: &ConnMaps) -> Next {
        for from in [0, 1] {
            let to = 1 - from;
            let Some(d) = self.drain[from].as_mut() else {
                continue;
            };
            // tcpi_bytes_received counts the FIN, which is in by now.
            let received = sys::tcp_bytes_received(&self.socks[from]).unwrap_or(1).saturating_sub(1);
            let redirected = maps.redirected(self.cookies[from]).unwrap_or(0);
            let written = sys::tcp_bytes_written(&self.socks[to]).unwrap_or(0).saturating_sub(self.written_base[to]);
            log::trace!("drain {}: received {received} redirected {redirected} written {written}", side_name(from));
            if redirected >= received && written >= redirected {
                // Errors here mean the peer is already gone; its own event follows.
                let _ = self.socks[to].shutdown(Shutdown::Write);
                self.wr_shut[to] = true;
                self.drain[from] = None;
            } else if written > d.last_written {
                d.last_written = written;
                d.last_progress = Instant::now();
            } else if d.last_progress.elapsed() > DRAIN_STALL {
                log::warn!(
                    "{} accepted no bytes for {DRAIN_STALL:?} after the {} closed ({written} of {redirected} \
                     bytes delivered); resetting",
                    side_name(to),
                    side_name(from)
                );
                return Next::Abort(to);
            }
        }
        if self.rd_closed == [true; 2] && self.wr_shut == [true; 2] { Next::Close } else { Next::Keep }
    }

    fn pending(&self) -> bool {
        self.drain.iter().any(Option::is_some)
    }

    /// Whether neither socket redirected a byte since `now_ns - idle_ns`.
    fn idle(&self, maps: &ConnMaps, now_ns: u64, idle_ns: u64) -> bool {
        let last = self.cookies.iter().filter_map(|c| maps.record(*c)).map(|r| r.last_active_ns).max();
        last.is_some_and(|l| now_ns.saturating_sub(l) > idle_ns)
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
    pub fn watch(&self, conn: Spliced, cookies: [u64; 2], written_base: [u64; 2]) -> Result<(), SpliceError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let fds = [conn.client.as_raw_fd(), conn.server.as_raw_fd()];
        let events = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        for (side, fd) in fds.into_iter().enumerate() {
            if let Err(e) = self.shared.epoll.add(fd, events, id << 1 | side as u64) {
                if side == 1 {
                    let _ = self.shared.epoll.delete(fds[0]);
                }
                let _ = self.send(Msg::Cancel(id));
                return Err(SpliceError::Socket(e));
            }
        }
        let conn = Conn {
            socks: [conn.client, conn.server],
            cookies,
            written_base,
            rd_closed: [false; 2],
            wr_shut: [false; 2],
            drain: [None, None],
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
    let bytes = conn.cookies.map(|c| maps.redirected(c).unwrap_or(0));
    conn.guard.add_bytes(bytes[CLIENT], bytes[1 - CLIENT]);
    maps.forget_closing(conn.cookies);
    drop(conn); // closes both sockets, exactly once
}
