//! The packet plane's hand-over: joining a spliced connection's two TCP
//! connections at packet level, after which lb closes both of its sockets
//! without a sound and the TC program (`lb_packet`) carries every packet.
//!
//! The connection arrives spliced on the sockmap plane, which has been
//! moving bytes both ways in the kernel. The join:
//!
//! 1. **Hold.** Both directions go into `LB_FLOWS` as `HOLD`: from now on
//!    the program drops every packet of either peer that carries bytes or
//!    a FIN (the peer sends it again later), and lets bare ACKs through to
//!    lb's sockets. So lb's sockets take nothing new, while the ACKs of
//!    what they sent still reach them.
//! 2. **Drain.** Wait until each socket's peer has acknowledged every byte
//!    the other socket received (`tcpi_bytes_acked` against
//!    `tcpi_bytes_received`, with the server socket's SYN and lb's own
//!    PROXY header accounted): nothing lb took from one peer is still on
//!    its way to the other, in a psock queue, a send queue, or unacked.
//! 3. **Timestamps.** The program has recorded each peer's last TSval
//!    (from the ACKs it let through). A peer that sent nothing since the
//!    hold is asked: lb's socket leaves repair mode with a window probe,
//!    which the peer answers with an ACK.
//! 4. **Read.** Both sockets go into repair mode; their sequence numbers,
//!    current TSvals, window scales, options and MSS are read.
//! 5. **Check.** Connections that cannot be joined exactly stay on the
//!    sockmap plane, counted by reason: one side with timestamps and the
//!    other without, or an MSS one side may send that the other does not
//!    accept.
//! 6. **Join.** Both directions become `JOINED` with their offsets (one
//!    `bpf()`), and both sockets are closed in repair mode: the kernel
//!    sends neither FIN nor RST, and the peers never notice.
//!
//! Since the sequence offsets are fixed by the two connections' state once
//! nothing is in flight, a byte reaches the same place of the other
//! stream whichever way it goes; what the hold dropped, the peers send
//! again, and it is rewritten like any later packet.

use std::{
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::Duration,
};

use lb_common::packet::{Flow, FlowKey, HOLD, JOINED};

use crate::{
    addr::ip16,
    kernel::{
        flows::FlowMaps,
        sys::{self, JoinState, TCPI_OPT_TIMESTAMPS, TCPI_OPT_USEC_TS},
    },
};

/// How long lb's sockets may take to deliver what they hold.
const DRAIN_WITHIN: Duration = Duration::from_secs(1);
/// How far ahead of the socket it replaces a translated TSval starts: the
/// socket may send once more after its TSval was read, and a peer drops a
/// segment whose TSval is below the last one it took.
const TS_MARGIN: u32 = 1000;
/// `TCP_ESTABLISHED` in `tcpi_state`.
const ESTABLISHED: u8 = 1;

/// Why a connection of a packet-plane frontend stays on the sockmap plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// One connection uses timestamps and the other does not (or one in
    /// microseconds and the other in milliseconds).
    Timestamps,
    /// One side may send segments larger than the other accepts.
    Mss,
    /// A side closed or reset during the hand-over.
    Closed,
    /// lb's sockets did not finish delivering in time.
    Timeout,
    /// The flow map refused the entries.
    Map,
}

/// The addresses of a spliced connection, as the program sees them.
#[derive(Clone, Copy, Debug)]
pub struct Ends {
    pub client: SocketAddr,
    /// The frontend address the client connected to.
    pub local: SocketAddr,
    /// lb's source address toward the server.
    pub source: SocketAddr,
    pub server: SocketAddr,
}

impl Ends {
    /// `[client's packets, server's packets]`, as they arrive at lb.
    pub fn keys(&self) -> [FlowKey; 2] {
        [key(self.client, self.local), key(self.server, self.source)]
    }
}

fn key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    FlowKey { src: ip16(src.ip()), dst: ip16(dst.ip()), sport: src.port().to_be(), dport: dst.port().to_be(), _pad: 0 }
}

/// What the join needs of a connection.
pub struct Joining<'a> {
    pub socks: &'a [TcpStream; 2],
    pub ends: Ends,
    /// Bytes lb wrote to the server itself (the PROXY header).
    pub header: u64,
    pub id: u64,
    pub slot: u16,
    pub start_ns: u64,
    /// Indexes of the frontend and the backend.
    pub route: [u16; 2],
}

/// Joins the connection, or says why not (the sockets are then as they
/// were: out of repair mode, spliced, nothing held).
pub async fn join(flows: &Mutex<FlowMaps>, j: &Joining<'_>) -> Result<(), Kept> {
    let keys = j.ends.keys();
    let hold = held(j);
    lock(flows).put(keys, hold).map_err(|e| {
        log::debug!("packet plane: {e}");
        Kept::Map
    })?;
    let r = hand_over(flows, j, keys).await;
    if r.is_err() {
        lock(flows).remove(&keys);
        for s in j.socks {
            let _ = sys::set_repair(s, false, false);
        }
    }
    r
}

fn lock(flows: &Mutex<FlowMaps>) -> std::sync::MutexGuard<'_, FlowMaps> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

/// Both directions, held.
fn held(j: &Joining<'_>) -> [Flow; 2] {
    let e = &j.ends;
    let now = sys::monotonic_coarse_ns();
    let base = Flow {
        state: HOLD,
        slot: j.slot,
        frontend: j.route[0],
        backend: j.route[1],
        id: j.id,
        start_ns: j.start_ns,
        last_ns: now,
        ..Flow::default()
    };
    [
        Flow {
            src: ip16(e.source.ip()),
            dst: ip16(e.server.ip()),
            sport: e.source.port().to_be(),
            dport: e.server.port().to_be(),
            client: 1,
            ..base
        },
        Flow {
            src: ip16(e.local.ip()),
            dst: ip16(e.client.ip()),
            sport: e.local.port().to_be(),
            dport: e.client.port().to_be(),
            ..base
        },
    ]
}

async fn hand_over(flows: &Mutex<FlowMaps>, j: &Joining<'_>, keys: [FlowKey; 2]) -> Result<(), Kept> {
    drained(j).await?;
    let timestamps = timestamps_seen(flows, j, keys).await?;
    for s in j.socks {
        sys::set_repair(s, true, false).map_err(|_| Kept::Closed)?;
    }
    let st = [sys::join_state(&j.socks[0]), sys::join_state(&j.socks[1])];
    let [Ok(c), Ok(s)] = st else { return Err(Kept::Closed) };
    // Nothing arrived meanwhile (a packet past the program before the hold).
    if !settled(j)? {
        return Err(Kept::Timeout);
    }
    check(&c, &s)?;
    let ts_last = if timestamps {
        let f = lock(flows);
        [f.get(&keys[0]).map_or(0, |f| f.ts_last), f.get(&keys[1]).map_or(0, |f| f.ts_last)]
    } else {
        [0, 0]
    };
    let joined = joined(held(j), &c, &s, timestamps.then_some(ts_last));
    lock(flows).put(keys, joined).map_err(|e| {
        log::debug!("packet plane: {e}");
        Kept::Map
    })
}

/// Waits until nothing lb took from either peer is still on its way to
/// the other.
async fn drained(j: &Joining<'_>) -> Result<(), Kept> {
    let deadline = tokio::time::Instant::now() + DRAIN_WITHIN;
    let mut pause = Duration::ZERO;
    let mut once = false;
    loop {
        if settled(j)? {
            // Twice in a row, with a pause between: a packet that passed
            // the program just before the hold has landed by then.
            if once {
                return Ok(());
            }
            once = true;
        } else {
            once = false;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Kept::Timeout);
        }
        if pause.is_zero() {
            tokio::task::yield_now().await;
            pause = Duration::from_micros(1);
        } else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

/// Whether every byte each socket received is acknowledged by the other's
/// peer, both still established.
fn settled(j: &Joining<'_>) -> Result<bool, Kept> {
    let p = |s| sys::tcp_progress(s).map_err(|_| Kept::Closed);
    let ((cs, c_rcvd, c_acked), (ss, s_rcvd, s_acked)) = (p(&j.socks[0])?, p(&j.socks[1])?);
    if cs != ESTABLISHED || ss != ESTABLISHED {
        return Err(Kept::Closed);
    }
    // The server socket's acknowledged count includes its SYN and lb's header.
    Ok(s_acked.saturating_sub(1 + j.header) == c_rcvd && c_acked == s_rcvd)
}

/// Whether both connections use timestamps; if they do, waits until the
/// program has a TSval of each peer (asking a silent one with a probe).
async fn timestamps_seen(flows: &Mutex<FlowMaps>, j: &Joining<'_>, keys: [FlowKey; 2]) -> Result<bool, Kept> {
    let opts = |s: &TcpStream| sys::join_options(s).map_err(|_| Kept::Closed);
    let (c, s) = (opts(&j.socks[0])?, opts(&j.socks[1])?);
    let ts = |o: u8| o & TCPI_OPT_TIMESTAMPS != 0;
    if ts(c) != ts(s) || (c ^ s) & TCPI_OPT_USEC_TS != 0 {
        return Err(Kept::Timestamps);
    }
    if !ts(c) {
        return Ok(false);
    }
    let deadline = tokio::time::Instant::now() + DRAIN_WITHIN;
    let mut probed = [false; 2];
    loop {
        let seen = {
            let f = lock(flows);
            [0, 1].map(|i| f.get(&keys[i]).is_some_and(|f| f.ts_last != 0))
        };
        if seen == [true; 2] {
            return Ok(true);
        }
        for i in 0..2 {
            if !seen[i] && !probed[i] {
                // A window probe: the peer answers with a bare ACK, which
                // the program lets through and reads.
                let s = &j.socks[i];
                sys::set_repair(s, true, false).and_then(|()| sys::set_repair(s, false, true)).map_err(|_| Kept::Closed)?;
                probed[i] = true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Kept::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Connections that cannot be joined exactly.
fn check(c: &JoinState, s: &JoinState) -> Result<(), Kept> {
    // What the client may send (lb's advertised MSS to it) must fit what
    // the server accepts, and the other way round.
    if c.advmss > s.peer_mss || s.advmss > c.peer_mss {
        return Err(Kept::Mss);
    }
    Ok(())
}

/// The two directions, joined: `c` is the client socket's state, `s` the
/// server socket's, `ts_last` each peer's last TSval (timestamps on).
fn joined(mut f: [Flow; 2], c: &JoinState, s: &JoinState, ts_last: Option<[u32; 2]>) -> [Flow; 2] {
    let [to_server, to_client] = &mut f;
    // The client's next byte, expected by lb's client socket at c.rcv_nxt,
    // is the server's next at s.snd_nxt; the client acknowledges lb's
    // client socket's stream, which continues the server's.
    to_server.seq_add = s.snd_nxt.wrapping_sub(c.rcv_nxt);
    to_server.ack_add = s.rcv_nxt.wrapping_sub(c.snd_nxt);
    to_client.seq_add = c.snd_nxt.wrapping_sub(s.rcv_nxt);
    to_client.ack_add = c.rcv_nxt.wrapping_sub(s.snd_nxt);
    // Windows: the client's are in units of its scale (lb's client socket
    // reads them with snd_wscale); the server reads lb's server socket's
    // windows with the scale that socket announced (rcv_wscale).
    (to_server.win_in, to_server.win_out) = (c.snd_wscale, s.rcv_wscale);
    (to_client.win_in, to_client.win_out) = (s.snd_wscale, c.rcv_wscale);
    if let Some([c_ts, s_ts]) = ts_last {
        // Each peer's TSvals continue those of the socket it talked to,
        // from a little ahead of where that socket's stand now; its echoes
        // go back exactly.
        to_server.tsval_add = s.tsval.wrapping_add(TS_MARGIN).wrapping_sub(c_ts);
        to_client.tsval_add = c.tsval.wrapping_add(TS_MARGIN).wrapping_sub(s_ts);
        to_server.tsecr_add = to_client.tsval_add.wrapping_neg();
        to_client.tsecr_add = to_server.tsval_add.wrapping_neg();
    }
    for d in &mut f {
        d.state = JOINED;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(snd_nxt: u32, rcv_nxt: u32, tsval: u32, wscale: (u8, u8)) -> JoinState {
        JoinState {
            snd_nxt,
            rcv_nxt,
            tsval,
            options: 7,
            snd_wscale: wscale.0,
            rcv_wscale: wscale.1,
            advmss: 1460,
            peer_mss: 1460,
        }
    }

    #[test]
    fn offsets_map_each_stream_onto_the_other() {
        // Client socket: sent up to 1000, received up to 5000. Server
        // socket: sent up to 90_000 (the client's bytes and a header),
        // received up to 7.
        let c = state(1000, 5000, 400, (7, 9));
        let s = state(90_000, 7, u32::MAX - 10, (6, 7));
        let [to_s, to_c] = joined([Flow::default(); 2], &c, &s, Some([100, 200]));
        // The client's next byte (seq 5000) is the server's 90_000.
        assert_eq!(5000u32.wrapping_add(to_s.seq_add), 90_000);
        // The client acknowledging all of lb's client stream (1000) acks
        // all the server sent (7).
        assert_eq!(1000u32.wrapping_add(to_s.ack_add), 7);
        assert_eq!(7u32.wrapping_add(to_c.seq_add), 1000);
        assert_eq!(90_000u32.wrapping_add(to_c.ack_add), 5000);
        // A TSval the client sends goes out ahead of lb's server socket's,
        // and its echo comes back as the client sent it (across the wrap).
        let out = 100u32.wrapping_add(to_s.tsval_add);
        assert_eq!(out, s.tsval.wrapping_add(TS_MARGIN));
        assert_eq!(out.wrapping_add(to_c.tsecr_add), 100);
        let back = 200u32.wrapping_add(to_c.tsval_add);
        assert_eq!(back.wrapping_add(to_s.tsecr_add), 200);
        assert_eq!((to_s.win_in, to_s.win_out, to_c.win_in, to_c.win_out), (7, 7, 6, 9));
        assert_eq!((to_s.state, to_c.state), (JOINED, JOINED));
    }

    #[test]
    fn mss_that_does_not_fit_keeps_the_connection() {
        let c = state(0, 0, 0, (0, 0));
        let mut s = state(0, 0, 0, (0, 0));
        assert_eq!(check(&c, &s), Ok(()));
        s.peer_mss = 1400;
        assert_eq!(check(&c, &s), Err(Kept::Mss));
    }
}
