//! The holder's side of the packet plane: the joined connections of its
//! worker slot, which have no socket to watch. One thread, `lb-packet-ends`:
//!
//! - reads the slot's ring of ends (`LB_PACKET_ENDS`), which the TC program
//!   writes when a connection's second FIN or a reset passes, reports each
//!   end to the worker, and removes the connection's two flows a moment
//!   later (after the last ACK; at once after a reset);
//! - looks at each connection when it could first be idle for
//!   `timeouts.idle` (the flows' last packet times) and removes an idle one;
//! - at its start takes over the flows of its slot already in `LB_FLOWS`:
//!   joined connections outlive every lb process (the program and the map
//!   stay pinned), so a holder that starts after a crash or an upgrade
//!   counts and ends them like its own.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    os::fd::OwnedFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lb_common::packet::{END_RST, Flow, FlowKey, PacketEnd};
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::{
    holder::wire::{Closed, Ending, Held},
    watcher::Report,
};
use crate::{addr::ip_of, kernel::flows::FlowMaps};

/// How long a connection's flows stay after its second FIN: its last ACK,
/// and a FIN sent again if that ACK is lost, are still rewritten.
const LINGER_FIN: Duration = Duration::from_secs(2);
/// Removals wait up to this much longer, so that the flows of many
/// connections go at one wake-up (a busy instance ends thousands a second).
const LINGER_SLACK: Duration = Duration::from_millis(250);
/// An end that came before its connection reached the thread is kept this long.
const EARLY_KEEP: Duration = Duration::from_secs(60);

/// One joined connection.
#[derive(Clone, Copy, Debug)]
pub struct Tracked {
    pub id: u64,
    /// `[client's packets, server's packets]`.
    pub keys: [FlowKey; 2],
}

const RUN: u8 = 0;
const STOP: u8 = 1;
const DETACH: u8 = 2;

struct Shared {
    inbox: Mutex<Vec<Tracked>>,
    wake: OwnedFd,
    stop: AtomicU8,
}

impl Shared {
    fn notify(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The thread and its inbox.
pub struct Packets {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Packets {
    /// Starts the thread of worker slot `slot` on the maps at `pin_path`.
    /// Returns the connections of the slot found in `LB_FLOWS` (to count
    /// them again), already tracked.
    pub fn start(pin_path: &Path, slot: u16, idle: Duration, report: impl Report) -> anyhow::Result<(Self, Vec<Held>)> {
        let flows = FlowMaps::open(pin_path)?;
        let ring = crate::kernel::flows::ends_ring(pin_path, slot)?;
        let (found, ended) = found(&flows, slot);
        let shared = Arc::new(Shared {
            inbox: Mutex::new(found.iter().map(|(t, _)| *t).collect()),
            wake: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            stop: AtomicU8::new(RUN),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lb-packet-ends".into())
            .spawn(move || run(&s, flows, ring, idle, ended, report))?;
        if !found.is_empty() {
            log::info!("packet plane: {} joined connection(s) of slot {slot} found", found.len());
        }
        Ok((Self { shared, thread: Mutex::new(Some(thread)) }, found.into_iter().map(|(_, h)| h).collect()))
    }

    /// Tracks a connection joined from here on.
    pub fn watch(&self, t: Tracked) {
        self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }

    /// Ends the thread; `remove`: the instance stops, and every joined
    /// connection's flows go (a peer that sends again gets a reset from
    /// this host); otherwise they stay for the next holder.
    pub fn stop(&self, remove: bool) {
        self.shared.stop.store(if remove { STOP } else { DETACH }, Ordering::Release);
        self.shared.notify();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A joined connection whose flows ended: its id and keys.
type Ended = (u64, [FlowKey; 2]);

/// The slot's joined connections in the map, as tracked and as held
/// (for the worker's count), and the keys of those already ended.
fn found(flows: &FlowMaps, slot: u16) -> (Vec<(Tracked, Held)>, Vec<Ended>) {
    let (mut live, mut ended) = (Vec::new(), Vec::new());
    for (key, f) in flows.all() {
        if f.slot != slot || f.client == 0 {
            continue;
        }
        let keys = [key, f.reverse_key()];
        if f.ended != 0 {
            ended.push((f.id, keys));
            continue;
        }
        let held = Held {
            id: f.id,
            cookies: [f.id, 0],
            written_base: [0, 0],
            client_copied: false,
            frontend: f.frontend,
            backend: f.backend,
            client: SocketAddr::new(ip_of(key.src), u16::from_be(key.sport)),
            source: SocketAddr::new(ip_of(f.src), u16::from_be(f.sport)),
            server: SocketAddr::new(ip_of(f.dst), u16::from_be(f.dport)),
            start_ns: f.start_ns,
            packet: Some(SocketAddr::new(ip_of(key.dst), u16::from_be(key.dport))),
        };
        live.push((Tracked { id: f.id, keys }, held));
    }
    (live, ended)
}

/// The thread's own state.
struct Table {
    conns: HashMap<u64, (Tracked, Instant)>,
    idle_due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Flows to remove (a connection's id and keys), by when.
    linger: BinaryHeap<Reverse<(Instant, u64, [FlowKey; 2])>>,
    early: HashMap<u64, (PacketEnd, Instant)>,
}

fn run(
    shared: &Shared,
    mut flows: FlowMaps,
    mut ring: RingBuf<MapData>,
    idle: Duration,
    ended: Vec<(u64, [FlowKey; 2])>,
    mut report: impl Report,
) {
    let mut t = Table {
        conns: HashMap::new(),
        idle_due: BinaryHeap::new(),
        linger: ended.into_iter().map(|(id, k)| Reverse((Instant::now() + LINGER_FIN, id, k))).collect(),
        early: HashMap::new(),
    };
    loop {
        let now = Instant::now();
        let due =
            [t.idle_due.peek().map(|Reverse((d, _))| *d), t.linger.peek().map(|Reverse((d, _, _))| *d + LINGER_SLACK)]
                .into_iter()
                .flatten()
                .fold(now + Duration::from_secs(1), Instant::min);
        let wait = due.saturating_duration_since(now);
        let timeout = rustix::time::Timespec::try_from(wait).ok();
        let mut fds = [PollFd::new(&shared.wake, PollFlags::IN), PollFd::new(&ring, PollFlags::IN)];
        let _ = rustix::event::poll(&mut fds, timeout.as_ref());
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&shared.wake, &mut b);
        let now = Instant::now();
        let arrived = std::mem::take(&mut *shared.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for c in arrived {
            if let Some((ev, _)) = t.early.remove(&c.id) {
                ended_now(&mut t, &mut report, c, &ev, now);
                continue;
            }
            t.idle_due.push(Reverse((now + idle, c.id)));
            t.conns.insert(c.id, (c, now + idle));
        }
        while let Some(item) = ring.next() {
            let Some(ev) = item.get(..size_of::<PacketEnd>()).map(bytemuck::pod_read_unaligned::<PacketEnd>) else {
                continue;
            };
            match t.conns.remove(&ev.id) {
                Some((c, _)) => ended_now(&mut t, &mut report, c, &ev, now),
                None => {
                    t.early.insert(ev.id, (ev, now));
                }
            }
        }
        idle_looks(&mut t, &flows, idle, now, &mut report);
        let mut gone: Vec<(u64, [FlowKey; 2])> = Vec::new();
        while t.linger.peek().is_some_and(|Reverse((d, _, _))| *d <= now) {
            if let Some(Reverse((_, id, keys))) = t.linger.pop() {
                gone.push((id, keys));
            }
        }
        t.early.retain(|_, (_, at)| at.elapsed() < EARLY_KEEP);
        match shared.stop.load(Ordering::Acquire) {
            RUN => {}
            STOP => {
                for (id, (c, _)) in t.conns.drain() {
                    report.closed(Closed { id, bytes: bytes(&flows, &c.keys), how: Ending::Shutdown });
                    gone.push((id, c.keys));
                }
                gone.extend(t.linger.drain().map(|Reverse((_, id, k))| (id, k)));
                remove(&mut flows, &gone);
                report.flush();
                return;
            }
            _ => {
                // Detached: the flows stay for the next holder; lingering
                // ones it finds ended and removes itself.
                report.flush();
                return;
            }
        }
        remove(&mut flows, &gone);
        report.flush();
    }
}

/// Removes ended connections' flows (only those still theirs).
fn remove(flows: &mut FlowMaps, gone: &[(u64, [FlowKey; 2])]) {
    for (id, keys) in gone {
        flows.remove_of(*id, keys);
    }
}

/// Reports a connection's end and schedules its flows' removal.
fn ended_now(t: &mut Table, report: &mut impl Report, c: Tracked, ev: &PacketEnd, now: Instant) {
    let how = if ev.how == END_RST { Ending::Rst } else { Ending::Fin };
    report.closed(Closed { id: c.id, bytes: ev.bytes, how });
    let after = if how == Ending::Rst { Duration::ZERO } else { LINGER_FIN };
    t.linger.push(Reverse((now + after, c.id, c.keys)));
}

/// Bytes each way, from the flows as they stand.
fn bytes(flows: &FlowMaps, keys: &[FlowKey; 2]) -> [u64; 2] {
    keys.map(|k| flows.get(&k).map_or(0, |f| f.bytes))
}

/// Looks at the connections whose idle look is due: an idle one is
/// removed; one whose end the ring did not bring (a full ring) is ended
/// from its flows; the others are looked at again when they could be idle.
fn idle_looks(t: &mut Table, flows: &FlowMaps, idle: Duration, now: Instant, report: &mut impl Report) {
    let now_ns = crate::kernel::sys::monotonic_coarse_ns();
    while t.idle_due.peek().is_some_and(|Reverse((d, _))| *d <= now) {
        let Some(Reverse((_, id))) = t.idle_due.pop() else { break };
        let Some((c, due)) = t.conns.get(&id).copied() else { continue };
        if due > now {
            continue;
        }
        let f: [Option<Flow>; 2] = c.keys.map(|k| flows.get(&k));
        let (ended, last, b) = match f {
            [Some(a), Some(b)] => (a.ended != 0 || b.ended != 0, a.last_ns.max(b.last_ns), [a.bytes, b.bytes]),
            // Gone: a SYN reused the client's addresses, so it is over.
            _ => (true, 0, f.map(|x| x.map_or(0, |x| x.bytes))),
        };
        if ended {
            t.conns.remove(&id);
            report.closed(Closed { id, bytes: b, how: Ending::Fin });
            t.linger.push(Reverse((now + LINGER_FIN, id, c.keys)));
            continue;
        }
        let quiet = Duration::from_nanos(now_ns.saturating_sub(last));
        if quiet > idle {
            log::debug!("packet plane: connection {id} idle for more than {idle:?}; its flows are removed");
            t.conns.remove(&id);
            report.closed(Closed { id, bytes: b, how: Ending::Idle });
            t.linger.push(Reverse((now, id, c.keys)));
            continue;
        }
        let next = now + (idle - quiet).max(Duration::from_millis(1));
        t.conns.insert(id, (c, next));
        t.idle_due.push(Reverse((next, id)));
    }
}
