//! `splice_queue_limit`: a connection whose kernel queue toward one side
//! passes the limit is reset.
//!
//! The verdict hands every skb to the peer's psock queue, which has no
//! limit, and takes it off the source's receive queue, so the source's TCP
//! window stays open however far behind the destination is (2.3 GB in 3 s
//! into a backend that reads nothing). This kernel offers no safe way to
//! pause a spliced direction (ARCHITECTURE.md, "Facts behind bounding the
//! psock queue"); what remains is to end the connection. Every quarter of
//! the limit a direction redirects, the verdict sends a `FlowEvent` to the
//! slot's ring; [`events`] compares what was redirected with what the peer's
//! socket has taken, and past the limit resets both sides.

use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use lb_common::conn::FlowEvent;

use super::conn::{Conn, Next, side_name};

/// The limit, and its warning (at most every 5 s: with the limit on by
/// default, a busy instance may reset many).
pub(super) struct Limit {
    bytes: u64,
    warned: crate::observe::Every,
}

impl Limit {
    pub(super) fn new(bytes: u64) -> Self {
        Self { bytes, warned: crate::observe::Every::new() }
    }
}

/// Takes the flow events in the ring (there is one only with a limit); the
/// connections past the limit go to `done` to be reset (the close loop
/// skips a connection that is in `done` twice).
pub(super) fn events(
    ring: &mut RingBuf<MapData>,
    conns: &HashMap<u64, Conn>,
    limit: &mut Limit,
    done: &mut Vec<(u64, Next)>,
) {
    while let Some(item) = ring.next() {
        let Some(ev) = item.get(..size_of::<FlowEvent>()).map(bytemuck::pod_read_unaligned::<FlowEvent>) else {
            continue;
        };
        // Not here (yet, or any more): the next event looks again.
        let Some(conn) = conns.get(&ev.id) else { continue };
        let from = (ev.side & 1) as usize;
        if !conn.spliced(from) {
            continue;
        }
        let queued = ev.bytes.saturating_sub(conn.written(1 - from, ev.bytes));
        if queued > limit.bytes {
            if let Some(n) = limit.warned.hit() {
                log::warn!(
                    "{queued} bytes from the {} wait in the kernel for the {} (splice_queue_limit {}): resetting the \
                     connection ({n} connection(s) reset for this since the last warning)",
                    side_name(from),
                    side_name(1 - from),
                    limit.bytes
                );
            }
            done.push((ev.id, Next::Overflow));
        }
    }
}
