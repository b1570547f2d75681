//! The custody: lb's sockets deliver what they took before the join; and,
//! if a side reset meanwhile, the reset of the other side after it.

use std::{sync::Mutex, time::Duration};

use lb_common::packet::{Flow, FlowKey, Handshake, TURN};

use super::{Joining, key, lock, pause};
use crate::kernel::{flows::FlowMaps, sys};

/// How long the peers may take to acknowledge what lb's sockets deliver
/// after the join (a lost segment costs a retransmission timeout or more).
const CUSTODY_WITHIN: Duration = Duration::from_secs(60);

/// What the custody found: a side that reset, what lb's sockets forwarded.
pub(super) struct Delivered {
    /// The side that reset, and whether lb's socket took that reset (before
    /// the join) rather than the program holding it back.
    pub reset: Option<(usize, bool)>,
    /// FINs lb's sockets sent (toward the client, the server).
    pub shut: [bool; 2],
    /// Where the stream each of lb's sockets sent ends (client socket,
    /// server socket; each socket's own sequence numbers, a FIN included).
    pub end: [u32; 2],
}

/// Waits until lb's sockets have delivered everything they took before the
/// join, forwarding a FIN one of them got. If a side reset (the reset
/// reached lb's socket, or the program held it back), the bytes it sent
/// before are delivered first, as on a direct connection; the caller then
/// has the reset reach the other side.
pub(super) async fn custody(
    flows: &Mutex<FlowMaps>,
    j: &Joining<'_>,
    keys: [FlowKey; 2],
    hs: [&Handshake; 2],
) -> Delivered {
    let deadline = tokio::time::Instant::now() + CUSTODY_WITHIN;
    let mut shut = [false; 2];
    let mut reset = None;
    let mut end = [0u32; 2];
    for i in 0.. {
        let held = {
            let f = lock(flows);
            keys.map(|k| f.get(&k))
        };
        let mut done = true;
        for side in 0..2 {
            let to = 1 - side;
            let (state, rcvd) = match sys::tcp_progress(&j.socks[side]) {
                Ok((state, rcvd, _)) => (state, rcvd),
                Err(_) => (CLOSE, 0),
            };
            // A reset the program held back, or one lb's socket took.
            if state == CLOSE || held[side].is_some_and(|f| f.deferred & 2 != 0) {
                reset.get_or_insert((side, state == CLOSE));
            }
            // A FIN lb's socket took before the join goes on after its
            // bytes (its own FIN, sent below, shows as FIN_WAIT instead).
            let fin_in = matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT);
            let data = rcvd.saturating_sub(u64::from(fin_in));
            let base = if to == 1 { 1 + j.header } else { 0 };
            let written = sys::tcp_bytes_written(&j.socks[to], base + data).unwrap_or(0).saturating_sub(base);
            if written < data {
                done = false;
                continue;
            }
            if fin_in && !shut[to] && reset.is_none() {
                let _ = j.socks[to].shutdown(std::net::Shutdown::Write);
                shut[to] = true;
                done = false;
                continue;
            }
            // Acknowledged: before the join (nothing queued), or since (the
            // program saw the peer's ACK, in the socket's own numbers: the
            // connected side's SYN is in `base`, not in its stream).
            let queued = sys::tcp_queued(&j.socks[to]).unwrap_or(1);
            let sent = base + data + u64::from(shut[to]) - u64::from(to == 1);
            end[to] = hs[to].snd_base.wrapping_add(sent as u32);
            let acked = held[to].is_some_and(|f| f.ack_seen != 0 && end[to].wrapping_sub(f.ack_seen) as i32 <= 0);
            if queued != 0 && !acked {
                done = false;
            }
        }
        if done {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            log::warn!("packet plane: connection {}: lb's sockets did not deliver within {CUSTODY_WITHIN:?}", j.id);
            break;
        }
        pause(i, Duration::from_millis(1)).await;
    }
    Delivered { reset, shut, end }
}

/// `tcpi_state`s: reset; a FIN received (in the states it leads to).
const CLOSE: u8 = 7;
const TIME_WAIT: u8 = 6;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// How long lb waits for the program to turn its socket's reset.
const TURN_WITHIN: Duration = Duration::from_millis(100);

/// Side `dead` reset: its peer's stack has no socket left. The live peer
/// has everything lb's socket took from the dead one (the custody), and
/// may have taken more since the join straight from the dead peer, ending
/// with a reset the program held back (it passes none while lb's sockets
/// deliver). lb's socket to the live peer now resets it, moved by the
/// program ([`TURN`]) to where the dead side's stream ends: `end`, where
/// lb's socket stopped, or the held reset's sequence if that is further.
/// It lands exactly, as the dead side's own would have on a direct
/// connection, after every byte. (Without the entry, lb's socket's own
/// reset is exact whenever the dead side sent nothing after the join.)
pub(super) async fn reset_live(
    flows: &Mutex<FlowMaps>,
    j: &Joining<'_>,
    keys: [FlowKey; 2],
    dead: usize,
    by_socket: bool,
    end: u32,
) {
    let live = 1 - dead;
    let at = {
        let mut f = lock(flows);
        let held = f.get(&keys[dead]).filter(|d| !by_socket && d.deferred != 0);
        let at = match held {
            Some(d) if d.rst_seq.wrapping_sub(end) as i32 > 0 => d.rst_seq,
            _ => end,
        };
        // lb's socket's packets to the live peer: the dead side's flow's
        // rewritten addresses, so the entry's reverse is the live peer's flow.
        let e = &j.ends;
        let (from, to) = if live == 0 { (e.local, e.client) } else { (e.source, e.server) };
        let k = key(from, to);
        let turn = Flow {
            src: k.src,
            dst: k.dst,
            sport: k.sport,
            dport: k.dport,
            state: TURN,
            seq_add: at,
            id: j.id,
            slot: j.slot,
            ..Flow::default()
        };
        f.put_one(k, turn).ok().map(|()| k)
    };
    if let Err(e) = sys::disconnect(&j.socks[live]) {
        log::debug!("packet plane: connection {}: resetting the live side: {e}", j.id);
    }
    let Some(k) = at else { return };
    let deadline = tokio::time::Instant::now() + TURN_WITHIN;
    for i in 0.. {
        if lock(flows).get(&k).is_none_or(|t| t.ended != 0) || tokio::time::Instant::now() >= deadline {
            break;
        }
        pause(i, Duration::from_millis(1)).await;
    }
    lock(flows).remove(&[k]);
}
