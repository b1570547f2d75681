//! Close watcher for spliced connections.
//!
//! The kernel moves the bytes but does not forward EOF or resets. One thread
//! watches every spliced socket with `EPOLLRDHUP | EPOLLET` (no `EPOLLIN`, so
//! data arriving never wakes userspace) and:
//! - on FIN from one side, waits until every byte that side sent has been
//!   redirected and queued on the peer, then `shutdown(Write)`s the peer;
//! - on a reset or error, closes the peer abortively (RST) and both sockets;
//! - closes both sockets once both directions are finished,
//!
//! and tells its [`Report`] how each connection ended. It runs in the
//! holder process ([`super::holder`]), so a worker that dies takes none of
//! these connections with it.

mod conn;
mod limit;
mod looks;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::{Shutdown, TcpStream},
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};

use super::holder::wire::CopyState;
pub use conn::Dir;
use conn::{CLIENT, COPY_BUF, Conn, Copy, Flow, Next, interest};
use rustix::event::{
    EventfdFlags,
    epoll::{self, EventData, EventFlags},
};

use super::holder::wire::{Closed, Ending};
use crate::kernel::{maps::ConnMaps, sys};

/// Where the watcher says how its connections ended.
pub trait Report: Send + 'static {
    fn closed(&mut self, c: Closed);
    /// Called once per round of the watcher's loop, after its closes.
    fn flush(&mut self);
}

/// Epoll keys of the wake-up eventfd and of the flow-event ring; sockets
/// use `id << 1 | side` (ids are below 2^63).
const WAKE: u64 = u64::MAX;
const EVENTS: u64 = u64::MAX - 1;

/// How long the watcher polls every millisecond for the connection of an
/// event that came before it (`watch` pushes it microseconds after the
/// registration). Past this the event is taken for one of a connection
/// already closed: its file lives on while the worker still holds a copy,
/// and so does the registration.
const EARLY_POLL: Duration = Duration::from_secs(1);
/// An event kept this long without its connection is dropped (at a tidy-up).
const EARLY_KEEP: Duration = Duration::from_secs(60);

/// The watcher thread's own state: no other thread touches it.
struct Table {
    conns: HashMap<u64, Conn>,
    /// Connections with a pending EOF forward, by when to look at them next
    /// (an entry whose connection is gone or due later is skipped).
    pending: looks::Due,
    /// Events (by epoll key) for connections still on their way from
    /// `watch`, with when the first came; replayed when they arrive.
    early: HashMap<u64, (EventFlags, Instant)>,
    /// When the newest entry of `early` was made.
    early_newest: Option<Instant>,
    /// Events to look at in this round for connections that just arrived.
    replay: Vec<(u64, EventFlags)>,
    /// Connections by when to look whether they have been idle for
    /// `timeouts.idle` (each one's `idle_due`; an entry whose connection is
    /// gone or due later is skipped, and the heap is rebuilt from the
    /// connections when such entries outnumber them).
    idle_due: looks::Due,
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
    stopping: AtomicBool,
    /// Set with `stopping`: keep the connections open and hand them out.
    detach: AtomicBool,
    detached: Mutex<Vec<Detached>>,
    conf: WatchConf,
}

/// What the watcher of a worker slot's holder is told.
#[derive(Clone, Copy, Debug)]
pub struct WatchConf {
    /// `timeouts.idle`.
    pub idle: Duration,
    /// `splice_queue_limit` (0: none).
    pub queue: u64,
    /// The worker slot: which ring of `LB_EVENTS` is this holder's.
    pub slot: u16,
    /// Whether the slot's frontends join connections on the packet plane.
    pub packet: bool,
    /// The loop goes round at least this often, however idle (the holder's heartbeat).
    pub beat: Duration,
}

/// A connection the watcher let go of without closing it ([`Watcher::detach`]).
pub struct Detached {
    pub id: u64,
    pub socks: [TcpStream; 2],
    /// Of the copied client side, if it is copied.
    pub copy: Option<CopyState>,
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

pub struct Watcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Watcher {
    /// `maps`: the thread's own handles to the pinned maps; `ring`: the
    /// slot's flow events (with a `splice_queue_limit`, see [`limit`]).
    pub fn start(
        maps: ConnMaps,
        conf: WatchConf,
        ring: Option<RingBuf<MapData>>,
        report: impl Report,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            wake: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            inbox: Mutex::new(Inbox::default()),
            stopping: AtomicBool::new(false),
            detach: AtomicBool::new(false),
            detached: Mutex::new(Vec::new()),
            conf,
        });
        epoll::add(&shared.epoll, &shared.wake, EventData::new_u64(WAKE), EventFlags::IN)?;
        if let Some(r) = &ring {
            // Level-triggered: the ring wakes its reader only when it had caught up.
            epoll::add(&shared.epoll, r, EventData::new_u64(EVENTS), EventFlags::IN)?;
        }
        let s = shared.clone();
        let thread =
            std::thread::Builder::new().name("lb-splice-watch".into()).spawn(move || run(&s, maps, ring, report))?;
        Ok(Self { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Starts watching a spliced connection `[client, server]` under `id`
    /// (unique among the connections watched, below 2^63); from here on it
    /// owns both sockets, and on error it has reset them.
    ///
    /// The sockets join the epoll set before the connection reaches the
    /// thread (so nothing can close them while they are being added); an
    /// event that beats the connection there is kept until it arrives. A
    /// FIN or reset that came before this call is reported at once by the
    /// registration itself.
    /// `dirs`: how the bytes each side receives move (client's, server's);
    /// `copy`: where a copied client side stands, for one handed over.
    pub fn watch(
        &self,
        id: u64,
        socks: [TcpStream; 2],
        cookies: [u64; 2],
        written_base: [u64; 2],
        dirs: [Dir; 2],
        copy: Option<CopyState>,
    ) -> std::io::Result<()> {
        for (side, sock) in socks.iter().enumerate() {
            let key = EventData::new_u64(id << 1 | side as u64);
            if let Err(e) = epoll::add(&self.shared.epoll, sock, key, interest(side, dirs)) {
                if side == 1 {
                    let _ = epoll::delete(&self.shared.epoll, &socks[0]);
                }
                let _ = self.send(Msg::Cancel(id));
                for s in &socks {
                    let _ = sys::set_linger_zero(s);
                }
                return Err(e.into());
            }
        }
        let copy = copy.unwrap_or_default();
        let flows = dirs.map(|d| match d {
            Dir::Kernel => Flow::Kernel(None),
            Dir::User => {
                let mut buf = vec![0; COPY_BUF.max(copy.pending.len())].into_boxed_slice();
                buf[..copy.pending.len()].copy_from_slice(&copy.pending);
                Flow::User(Box::new(Copy {
                    buf,
                    len: copy.pending.len(),
                    off: 0,
                    eof: copy.eof,
                    reset: false,
                    bytes: copy.bytes,
                    last_ns: sys::monotonic_coarse_ns(),
                }))
            }
        });
        let copied = dirs.contains(&Dir::User);
        let idle_due = Instant::now() + self.shared.conf.idle;
        // A copied side handed over after its FIN was read has no FIN left to read.
        let rd_closed = dirs.map(|d| d == Dir::User && copy.eof);
        let conn = Conn { socks, cookies, written_base, rd_closed, wr_shut: [false; 2], flows, idle_due };
        self.send(Msg::Watch(id, conn))?;
        if copied {
            // A copied side is looked at once on arrival, even without an event.
            self.shared.notify();
        }
        Ok(())
    }

    fn send(&self, m: Msg) -> std::io::Result<()> {
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.closed {
            // The thread has stopped: `m` (and the sockets it holds) is dropped here.
            return Err(std::io::Error::other("the close watcher is stopping"));
        }
        inbox.msgs.push(m);
        Ok(())
    }

    /// Ends the thread without closing anything: every connection, with
    /// its sockets, is handed back (their registrations go with the
    /// watcher's epoll instance when it is dropped).
    pub fn detach(&self) -> Vec<Detached> {
        self.shared.detach.store(true, Ordering::Release);
        self.stop();
        std::mem::take(&mut *self.shared.detached.lock().unwrap_or_else(|e| e.into_inner()))
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
                    for (side, f) in conn.flows.iter().enumerate() {
                        let key = id << 1 | side as u64;
                        let mut events = self.early.remove(&key).map_or(EventFlags::empty(), |(e, _)| e);
                        // A copied side may have had all its bytes before the
                        // watch began: look at it once, as if an event came.
                        if matches!(f, Flow::User(_)) {
                            events |= EventFlags::IN;
                        }
                        if !events.is_empty() {
                            self.replay.push((key, events));
                        }
                    }
                    self.idle_due.push(Reverse((conn.idle_due, id)));
                    self.conns.insert(id, conn);
                }
                Msg::Cancel(id) => {
                    for side in [0, 1] {
                        self.early.remove(&(id << 1 | side));
                    }
                }
            }
        }
    }
}

fn run(shared: &Shared, mut maps: ConnMaps, mut ring: Option<RingBuf<MapData>>, mut report: impl Report) {
    let mut buf: Vec<epoll::Event> = Vec::with_capacity(512);
    let idle = shared.conf.idle;
    let wake_every = looks::wake_interval(idle, shared.conf.beat);
    let mut next_tidy = Instant::now() + wake_every;
    let mut t = Table {
        conns: HashMap::new(),
        pending: BinaryHeap::new(),
        early: HashMap::new(),
        early_newest: None,
        replay: Vec::new(),
        idle_due: BinaryHeap::new(),
    };
    let (mut gone, mut limit): (Vec<u64>, _) = (Vec::new(), limit::Limit::new(shared.conf.queue));
    loop {
        let early_wait = !t.early.is_empty() && t.early_newest.is_some_and(|n| n.elapsed() < EARLY_POLL);
        let timeout = if early_wait {
            Duration::from_millis(1)
        } else {
            let due = [looks::first(&t.pending), looks::first(&t.idle_due)]
                .into_iter()
                .flatten()
                .fold(next_tidy, Instant::min);
            due.saturating_duration_since(Instant::now())
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
        let replay = std::mem::take(&mut t.replay);
        let mut done: Vec<(u64, Next)> = Vec::new();
        for (key, events) in replay.into_iter().chain(buf.iter().map(|ev| (ev.data.u64(), ev.flags))) {
            if key == WAKE {
                shared.drain_wake();
                continue;
            }
            if key == EVENTS {
                if let Some(ring) = &mut ring {
                    limit::events(ring, &t.conns, &mut limit, &mut done);
                }
                continue;
            }
            let (id, side) = (key >> 1, (key & 1) as usize);
            let Some(conn) = t.conns.get_mut(&id) else {
                let now = Instant::now();
                t.early.entry(key).or_insert((EventFlags::empty(), now)).0 |= events;
                t.early_newest = Some(now);
                continue;
            };
            let before = conn.next_look();
            match conn.on_event(side, events, &maps) {
                Next::Keep => looks::schedule(&mut t.pending, id, before, conn),
                next => done.push((id, next)),
            }
        }
        let now = Instant::now();
        while let Some(id) = looks::pop_due(&mut t.pending, now) {
            let Some(conn) = t.conns.get_mut(&id) else { continue };
            let before = conn.next_look();
            if before.is_none_or(|n| n > now) {
                continue; // done meanwhile, or due later (with an entry of its own)
            }
            match conn.progress() {
                Next::Keep => looks::schedule(&mut t.pending, id, before, conn),
                next => done.push((id, next)),
            }
        }
        if now >= next_tidy {
            next_tidy = now + wake_every;
            t.early.retain(|_, (_, since)| since.elapsed() < EARLY_KEEP);
        }
        looks::idle(&mut t.idle_due, &mut t.conns, &maps, idle, now, &mut done);
        for (id, next) in done {
            let Some(conn) = t.conns.remove(&id) else {
                continue;
            };
            let how = match next {
                Next::Abort(side) => {
                    let _ = sys::set_linger_zero(&conn.socks[1 - side]);
                    Ending::Rst
                }
                Next::Overflow => {
                    for s in &conn.socks {
                        let _ = sys::set_linger_zero(s);
                    }
                    Ending::Rst
                }
                Next::Idle => {
                    log::debug!("closing a connection idle for more than {idle:?}");
                    for s in &conn.socks {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    Ending::Idle
                }
                Next::Keep | Next::Close => Ending::Fin,
            };
            report.closed(close(&maps, id, conn, how, &mut gone));
        }
        // One bpf() for the records of every connection closed this round.
        maps.forget_closing(&gone);
        gone.clear();
        if shared.stopping.load(Ordering::Acquire) {
            t.receive(shared, true);
            t.pending.clear();
            if shared.detach.load(Ordering::Acquire) {
                let mut out = shared.detached.lock().unwrap_or_else(|e| e.into_inner());
                out.extend(t.conns.drain().map(|(id, c)| c.detach(id)));
                report.flush();
                return;
            }
            for (id, conn) in t.conns.drain() {
                report.closed(close(&maps, id, conn, Ending::Shutdown, &mut gone));
            }
            maps.forget_closing(&gone);
            report.flush();
            return;
        }
        report.flush();
    }
}

/// Closes `conn`; the cookies of its records go to `gone`, for the caller
/// to remove (after the sockets closed: no verdict can write them again).
fn close(maps: &ConnMaps, id: u64, conn: Conn, how: Ending, gone: &mut Vec<u64>) -> Closed {
    let bytes = conn.bytes(maps);
    gone.extend(conn.cookies);
    drop(conn); // closes both sockets, exactly once
    Closed { id, bytes: [bytes[CLIENT], bytes[1 - CLIENT]], how }
}
