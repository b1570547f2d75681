//! The custody: lb's sockets deliver what they took before the join.

use std::{sync::Mutex, time::Duration};

use lb_common::packet::{FlowKey, Handshake};

use super::{Joining, lock, pause};
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
        pause(i).await;
    }
    Delivered { reset, shut, end }
}

/// `tcpi_state`s: reset; a FIN received (in the states it leads to).
const CLOSE: u8 = 7;
const TIME_WAIT: u8 = 6;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;
