//! Close watcher for spliced connections.
//!
//! The kernel moves the bytes but does not forward EOF or resets. One thread
//! watches every spliced socket with `EPOLLRDHUP | EPOLLET` (no `EPOLLIN`, so
//! data arriving never wakes userspace) and:
//! - on FIN from one side, waits until every byte that side sent has been
//!   redirected and queued on the peer, then `shutdown(Write)`s the peer;
//! - on a reset or error, closes the peer abortively (RST) and both sockets;
//! - closes both sockets once both directions are finished.

mod conn;

use std::{
    collections::{HashMap, HashSet},
    net::Shutdown,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use conn::Dir;
use conn::{CLIENT, COPY_BUF, Conn, Copy, Flow, Next, interest};
use rustix::event::{
    EventfdFlags,
    epoll::{self, EventData, EventFlags},
};

use super::{SpliceError, Spliced};
use crate::{
    kernel::{maps::ConnMaps, sys},
    observe::{conn::CloseReason, counters::Counters},
};

/// Epoll key of the wake-up eventfd; sockets use `id << 1 | side`.
const WAKE: u64 = u64::MAX;

/// The watcher thread's own state: no other thread touches it.
struct Table {
    conns: HashMap<u64, Conn>,
    /// Connections with a pending EOF forward, polled every millisecond.
    pending: HashSet<u64>,
    /// Events (by epoll key) for connections still on their way from
    /// `watch`, replayed when they arrive.
    early: HashMap<u64, EventFlags>,
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
    epoll: OwnedFd,
    /// An eventfd that wakes the thread for new connections and to stop.
    wake: OwnedFd,
    /// New connections. `watch` holds this lock only to push, so accepting
    /// never waits for the watcher's map work.
    inbox: Mutex<Inbox>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    stats: Arc<Counters>,
    idle: Duration,
}

impl Shared {
    fn notify(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
    fn drain_wake(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut b);
    }
}

pub(super) struct Watcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Watcher {
    /// `maps`: the thread's own handles to the pinned maps.
    pub fn start(maps: ConnMaps, stats: Arc<Counters>, idle: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            wake: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            inbox: Mutex::new(Inbox::default()),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stats,
            idle,
        });
        epoll::add(&shared.epoll, &shared.wake, EventData::new_u64(WAKE), EventFlags::IN)?;
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
        let socks = [conn.socks.client(), conn.socks.server()];
        for (side, sock) in socks.into_iter().enumerate() {
            let key = EventData::new_u64(id << 1 | side as u64);
            if let Err(e) = epoll::add(&self.shared.epoll, sock, key, interest(side, dirs)) {
                if side == 1 {
                    let _ = epoll::delete(&self.shared.epoll, socks[0]);
                }
                let _ = self.send(Msg::Cancel(id));
                return Err(SpliceError::Socket(e.into()));
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
        self.shared.notify();
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
                            *self.early.entry(id << 1 | side as u64).or_insert(EventFlags::empty()) |= EventFlags::IN;
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
    let mut buf: Vec<epoll::Event> = Vec::with_capacity(512);
    let sweep_every = sweep_interval(shared.idle);
    let mut next_sweep = Instant::now() + sweep_every;
    let mut t = Table { conns: HashMap::new(), pending: HashSet::new(), early: HashMap::new() };
    loop {
        let timeout = if t.pending.is_empty() && t.early.is_empty() {
            next_sweep.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
        } else {
            Duration::from_millis(1)
        };
        let timeout =
            rustix::time::Timespec::try_from(timeout).unwrap_or(rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 });
        buf.clear();
        match epoll::wait(&shared.epoll, rustix::buffer::spare_capacity(&mut buf), Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                log::error!("close watcher: epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        t.receive(shared, false);
        let arrived: Vec<u64> = t.early.keys().filter(|k| t.conns.contains_key(&(*k >> 1))).copied().collect();
        let replay: Vec<(u64, EventFlags)> = arrived.into_iter().filter_map(|k| t.early.remove_entry(&k)).collect();
        let mut done: Vec<(u64, Next)> = Vec::new();
        for (key, events) in replay.into_iter().chain(buf.iter().map(|ev| (ev.data.u64(), ev.flags))) {
            if key == WAKE {
                shared.drain_wake();
                continue;
            }
            let (id, side) = (key >> 1, (key & 1) as usize);
            let Some(conn) = t.conns.get_mut(&id) else {
                *t.early.entry(key).or_insert(EventFlags::empty()) |= events;
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
