//! When the close watcher looks at a connection again, without an event:
//! a direction waiting for the kernel to deliver the rest before its FIN is
//! forwarded ([`schedule`]), and the idle check ([`idle`]). Both are heaps
//! of `(due, id)`; an entry whose connection is gone or due later is
//! skipped when it comes up. Also how often the thread wakes with no event
//! at all ([`wake_interval`]).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    time::{Duration, Instant},
};

use super::conn::{Conn, Next};
use crate::kernel::{maps::ConnMaps, sys};

/// How often the thread wakes without an event: to take in the
/// connections queued meanwhile (`watch` does not wake it) and schedule
/// their idle looks, to tidy up, and to beat (the holder's heartbeat,
/// every `beat`). A quarter of the idle timeout, between 50 ms and 10 s,
/// so a connection's first look is never late, and at most `beat`.
pub(super) fn wake_interval(idle: Duration, beat: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(10)).min(beat)
}

/// Connections by when to look at them next.
pub(super) type Due = BinaryHeap<Reverse<(Instant, u64)>>;

/// When the first entry of `due` comes up.
pub(super) fn first(due: &Due) -> Option<Instant> {
    due.peek().map(|Reverse((d, _))| *d)
}

/// Takes the next entry of `due` that has come up by `now`: its id.
pub(super) fn pop_due(due: &mut Due, now: Instant) -> Option<u64> {
    if first(due)? > now {
        return None;
    }
    due.pop().map(|Reverse((_, id))| id)
}

/// Gives `conn` an entry in `pending` for its next drain look, if that is
/// new (`before`: its next look before it was last looked at).
pub(super) fn schedule(pending: &mut Due, id: u64, before: Option<Instant>, conn: &Conn) {
    if let Some(next) = conn.next_look()
        && Some(next) != before
    {
        pending.push(Reverse((next, id)));
    }
}

/// Closes (through `done`) the connections that moved no byte for `idle`,
/// among those whose look is due; the others are looked at again when they
/// would be idle. A connection costs a look (two record reads) per idle
/// period, not one every few seconds for every connection held. The heap is
/// rebuilt from the connections when entries of closed ones outnumber them.
pub(super) fn idle(
    due: &mut Due,
    conns: &mut HashMap<u64, Conn>,
    maps: &ConnMaps,
    idle: Duration,
    now: Instant,
    done: &mut Vec<(u64, Next)>,
) {
    let now_ns = sys::monotonic_coarse_ns();
    while let Some(id) = pop_due(due, now) {
        let Some(conn) = conns.get_mut(&id) else { continue };
        if conn.idle_due > now {
            continue; // looked at meanwhile, with an entry of its own
        }
        let quiet = conn.last_active(maps).map_or(Duration::ZERO, |l| Duration::from_nanos(now_ns.saturating_sub(l)));
        if quiet > idle {
            // Already in `done` for another reason: the close loop takes the
            // first entry and skips this one.
            done.push((id, Next::Idle));
            continue;
        }
        // The clock of the records ticks coarsely: at least a millisecond on.
        conn.idle_due = now + (idle - quiet).max(Duration::from_millis(1));
        due.push(Reverse((conn.idle_due, id)));
    }
    if due.len() > 2 * conns.len() + 1024 {
        *due = conns.iter().map(|(id, c)| Reverse((c.idle_due, *id))).collect();
    }
}
