//! The packet plane's hand-over: joining a spliced connection's two TCP
//! connections at packet level, after which lb closes both of its sockets
//! without a sound and the TC program (`lb_packet`) carries every packet.
//!
//! The connection arrives spliced on the sockmap plane, which has been
//! moving bytes both ways in the kernel. The join:
//!
//! 1. **Watch.** Both directions go into `LB_FLOWS` as `WATCH`: packets
//!    still go to lb's sockets, and the program records each peer's TSval.
//!    A peer that sends nothing is asked: lb's socket leaves repair mode
//!    with a window probe, which the peer answers with an ACK.
//! 2. **Quiesce.** lb waits, a few milliseconds at most, until nothing it
//!    took from one peer is on its way to the other (below), so that the
//!    hold that follows is short.
//! 3. **Hold.** Both directions become `HOLD`: the program drops every
//!    packet of either peer that carries bytes or a FIN (the peer sends it
//!    again later), and lets bare ACKs through to lb's sockets. So lb's
//!    sockets take nothing new, while the ACKs of what they sent still
//!    reach them. Wait until each socket's peer has acknowledged every
//!    byte the other socket received (`tcpi_bytes_acked` against
//!    `tcpi_bytes_received`, with the server socket's SYN and lb's own
//!    PROXY header accounted): nothing is left in a psock queue, a send
//!    queue, or unacknowledged.
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

use lb_common::packet::{Flow, FlowKey, HOLD, JOINED, WATCH};

use crate::{
    addr::ip16,
    kernel::{
        flows::FlowMaps,
        sys::{self, JoinState, TCPI_OPT_TIMESTAMPS, TCPI_OPT_USEC_TS},
    },
};

/// How long lb's sockets may take, held, to deliver what they hold: past
/// it lb gives up (a peer that does not read), lets the packets through
/// again and keeps the connection on sockmap. Packets dropped meanwhile
/// cost their sender a retransmission.
const HOLD_WITHIN: Duration = Duration::from_millis(20);
/// How long a peer may take to answer a window probe (timestamps).
const PROBE_WITHIN: Duration = Duration::from_millis(200);
/// How long lb waits for a quiet moment before it holds a connection's
/// packets anyway (a sender that never pauses).
const QUIESCE_WITHIN: Duration = Duration::from_millis(5);
/// Checks of a held connection that only yield to the runtime before lb
/// starts sleeping between them: the hold should last microseconds.
const SPIN_CHECKS: u32 = 64;
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
    /// `[client, server]` socket cookies.
    pub cookies: [u64; 2],
    pub slot: u16,
    pub start_ns: u64,
    /// Indexes of the frontend and the backend.
    pub route: [u16; 2],
}

/// Joins the connection, or says why not (the sockets are then as they
/// were: out of repair mode, spliced, nothing held).
pub async fn join(flows: &Mutex<FlowMaps>, j: &Joining<'_>) -> Result<(), Kept> {
    let keys = j.ends.keys();
    lock(flows).put(keys, base(j, WATCH)).map_err(|e| {
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

/// Both directions in `state`, with nothing joined yet.
fn base(j: &Joining<'_>, state: u8) -> [Flow; 2] {
    let e = &j.ends;
    let now = sys::monotonic_coarse_ns();
    let base = Flow {
        state,
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
    let timestamps = timestamps(j)?;
    // Each peer's TSval from its handshake, which `lb_setup` recorded.
    let mut ts_ref = [0, 0];
    if timestamps {
        let mut f = lock(flows);
        ts_ref = j.cookies.map(|c| f.take_peer_ts(c).unwrap_or(0));
    }
    quiesce(j).await?;
    // The TSvals the program recorded go on into the held entries (a
    // write replaces the whole value).
    let mut hold = base(j, HOLD);
    {
        let mut f = lock(flows);
        for (h, k) in hold.iter_mut().zip(&keys) {
            h.ts_last = f.get(k).map_or(0, |w| w.ts_last);
        }
        f.put(keys, hold).map_err(|_| Kept::Map)?;
    }
    drained(j).await?;
    if timestamps && ts_ref.contains(&0) {
        ts_ref = seen_ts(flows, j, keys, ts_ref).await?;
    }
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
    let joined = joined(base(j, JOINED), &c, &s, timestamps.then_some(ts_ref));
    lock(flows).put(keys, joined).map_err(|e| {
        log::debug!("packet plane: {e}");
        Kept::Map
    })
}

/// Waits a little for a moment when nothing lb took from either peer is on
/// its way to the other, without holding anything.
async fn quiesce(j: &Joining<'_>) -> Result<(), Kept> {
    let deadline = tokio::time::Instant::now() + QUIESCE_WITHIN;
    for i in 0.. {
        if settled(j)? || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        pause(i).await;
    }
    Ok(())
}

/// Waits, holding, until nothing lb took from either peer is still on its
/// way to the other.
async fn drained(j: &Joining<'_>) -> Result<(), Kept> {
    let deadline = tokio::time::Instant::now() + HOLD_WITHIN;
    let mut once = false;
    for i in 0.. {
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
        pause(i).await;
    }
    Ok(())
}

/// The `i`th pause between two checks: a yield to the runtime at first,
/// then a millisecond (the runtime's timer granularity).
async fn pause(i: u32) {
    if i < SPIN_CHECKS {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(1)).await;
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

/// Whether both connections use timestamps (both the same kind).
fn timestamps(j: &Joining<'_>) -> Result<bool, Kept> {
    let opts = |s: &TcpStream| sys::join_options(s).map_err(|_| Kept::Closed);
    let (c, s) = (opts(&j.socks[0])?, opts(&j.socks[1])?);
    let ts = |o: u8| o & TCPI_OPT_TIMESTAMPS != 0;
    if ts(c) != ts(s) || (c ^ s) & TCPI_OPT_USEC_TS != 0 {
        return Err(Kept::Timestamps);
    }
    Ok(ts(c))
}

/// A TSval of each peer whose handshake's was not recorded (no `lb_setup`,
/// or its entry was evicted): the last the program saw, or else the answer
/// to a window probe (lb's socket leaves repair mode with one; the peer
/// answers with an ACK, which the program lets through and reads). Runs
/// held and drained: nothing lb's socket would send is in flight, so
/// toggling its repair mode cannot cut a send short.
async fn seen_ts(
    flows: &Mutex<FlowMaps>,
    j: &Joining<'_>,
    keys: [FlowKey; 2],
    mut ts: [u32; 2],
) -> Result<[u32; 2], Kept> {
    let deadline = tokio::time::Instant::now() + PROBE_WITHIN;
    let mut probed = [false; 2];
    for i in 0.. {
        settled(j)?;
        {
            let f = lock(flows);
            for d in 0..2 {
                if ts[d] == 0 {
                    ts[d] = f.get(&keys[d]).map_or(0, |f| f.ts_last);
                }
            }
        }
        if !ts.contains(&0) {
            return Ok(ts);
        }
        for d in 0..2 {
            if ts[d] == 0 && !probed[d] {
                let s = &j.socks[d];
                sys::set_repair(s, true, false).and_then(|()| sys::set_repair(s, false, true)).map_err(|_| Kept::Closed)?;
                probed[d] = true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Kept::Timestamps);
        }
        pause(i).await;
    }
    Ok(ts)
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
