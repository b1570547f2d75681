//! The packet plane's hand-over: joining a spliced connection's two TCP
//! connections at packet level, after which lb closes both of its sockets
//! without a sound and the TC program (`lb_packet`) carries every packet.
//!
//! The connection arrives spliced on the sockmap plane, which moves bytes
//! both ways in the kernel; every byte one of lb's sockets receives goes to
//! the other unchanged. So the two connections' sequence spaces are tied
//! by where they start, which `lb_setup` recorded at each handshake
//! ([`Handshake`]): the client's byte `k` is the server's byte `k` plus
//! lb's PROXY header, and the other way without it. The join:
//!
//! 1. **Check.** Both connections must agree on what the program cannot
//!    translate: timestamps on both or neither (and in the same unit), and
//!    an MSS each side may send that the other accepts. Otherwise the
//!    connection stays on sockmap, counted by reason.
//! 2. **Quiet.** lb waits, briefly, for a moment when nothing it took from
//!    one peer is on its way to the other (each socket's bytes received all
//!    written to the other and acknowledged), so that the join hands over
//!    nothing in flight. A connection that is never quiet (a sender that
//!    never pauses) stays on sockmap.
//! 3. **Join.** Both directions go into `LB_FLOWS` joined (one `bpf()`):
//!    from then on the program rewrites every packet of either peer into
//!    the other connection. Nothing is dropped: bytes that reached lb's
//!    sockets just before are still delivered by them ("custody"), and
//!    while any may be, the program holds back a FIN or reset of the
//!    sender, which would overtake them, and records it. lb waits until
//!    the program has seen each peer acknowledge all lb's socket sent it,
//!    forwards a FIN or reset that reached its sockets before the join,
//!    and lifts the custody.
//! 4. **Close.** Both sockets go into repair mode and are closed: the
//!    kernel sends neither FIN nor RST, and the peers never notice.

use std::{
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::Duration,
};

use lb_common::packet::{Flow, FlowKey, Handshake, JOINED};

use crate::{
    addr::ip16,
    kernel::{
        flows::FlowMaps,
        sys::{self, TCPI_OPT_TIMESTAMPS, TCPI_OPT_USEC_TS},
    },
};

/// How long lb waits for a quiet moment before it leaves a connection on
/// sockmap.
const QUIET_WITHIN: Duration = Duration::from_millis(50);
/// How long the peers may take to acknowledge what lb's sockets deliver
/// after the join (a lost segment costs a retransmission timeout or more).
const CUSTODY_WITHIN: Duration = Duration::from_secs(60);
/// How far ahead of the socket it replaces a translated TSval starts: the
/// socket may send once more after its TSval was read (it still delivers
/// after the join), and a peer drops a segment whose TSval is below the
/// last it took. Ten ticks of the timestamp clock.
const TS_MARGIN: u32 = 10;
/// Bytes the timestamp option takes in every segment, with its padding.
const TS_OPTION: u32 = 12;
/// Checks that only yield to the runtime before lb sleeps between them.
const SPIN_CHECKS: u32 = 64;
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
    /// A side closed or reset before the join.
    Closed,
    /// No quiet moment: bytes kept flowing through lb.
    Busy,
    /// The flow map refused the entries, or a handshake was not recorded
    /// (no `lb_setup`).
    Map,
}

/// How a join ended once the flows were in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// The program carries the connection; lb's sockets are in repair mode.
    Carried,
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
    /// `[client, server]`.
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

fn lock(flows: &Mutex<FlowMaps>) -> std::sync::MutexGuard<'_, FlowMaps> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins the connection. `Err`: it stays on sockmap, the sockets as they
/// were. `Ok`: the program carries it (or it was reset meanwhile).
pub async fn join(flows: &Mutex<FlowMaps>, j: &Joining<'_>) -> Result<Joined, Kept> {
    let hs = {
        let mut f = lock(flows);
        j.cookies.map(|c| f.take_handshake(c))
    };
    let [Some(hc), Some(hsv)] = hs else { return Err(Kept::Map) };
    let (c, s) = (info(&j.socks[0])?, info(&j.socks[1])?);
    let timestamps = check(&c, &s, &hc, &hsv)?;
    quiet(j).await?;
    let ts_now = if timestamps {
        let now = |s: &TcpStream| sys::tcp_timestamp(s).map_err(|_| Kept::Closed);
        Some([now(&j.socks[0])?, now(&j.socks[1])?])
    } else {
        None
    };
    let keys = j.ends.keys();
    let mut flows_in = joined(base(j), [&hc, &hsv], j.header, [c.wscale, s.wscale], ts_now);
    lock(flows).put(keys, flows_in).map_err(|e| {
        log::debug!("packet plane: {e}");
        Kept::Map
    })?;
    // From here on the program rewrites every packet: the join cannot be
    // undone, only completed.
    let reset = custody(flows, j, keys, [&hc, &hsv]).await;
    // Custody lifted: FINs and resets pass from now on.
    {
        let mut f = lock(flows);
        for (i, k) in keys.iter().enumerate() {
            if let Some(now) = f.get(k) {
                flows_in[i] = Flow { custody: 0, ..now };
            }
        }
        let _ = f.put(keys, flows_in);
    }
    if let Some(side) = reset {
        // `side` reset: the program held the reset back, or lb's socket
        // took it before the join. Its peer's stack has no socket left and
        // answers anything with a reset in the right place of the stream;
        // so lb's other socket sends the other peer a window probe, whose
        // ACK goes to the dead side (joined) and brings the reset back.
        let _ = sys::window_probe(&j.socks[1 - side]);
    }
    for s in j.socks {
        let _ = sys::set_repair(s, true);
    }
    Ok(Joined::Carried)
}

/// What the join reads of one of lb's sockets.
struct Info {
    options: u8,
    /// Scale of the peer's windows, and of the socket's own.
    wscale: (u8, u8),
    advmss: u32,
}

fn info(s: &TcpStream) -> Result<Info, Kept> {
    let i = sys::join_info(s).map_err(|_| Kept::Closed)?;
    if i.state != ESTABLISHED {
        return Err(Kept::Closed);
    }
    Ok(Info { options: i.options, wscale: (i.snd_wscale, i.rcv_wscale), advmss: i.advmss })
}

/// Connections that cannot be joined exactly; whether both use timestamps.
fn check(c: &Info, s: &Info, hc: &Handshake, hs: &Handshake) -> Result<bool, Kept> {
    let ts = |o: u8| o & TCPI_OPT_TIMESTAMPS != 0;
    if ts(c.options) != ts(s.options) || (c.options ^ s.options) & TCPI_OPT_USEC_TS != 0 {
        return Err(Kept::Timestamps);
    }
    // Each peer's TSvals are anchored by the one of its handshake.
    if ts(c.options) && (hc.peer_tsval == 0 || hs.peer_tsval == 0) {
        return Err(Kept::Timestamps);
    }
    // What the client may send (lb's MSS to it) must fit what the server
    // takes (its MSS), and the other way round. A socket's `advmss` is its
    // MSS less the timestamp option (12 bytes with its padding) when the
    // connection has one; 0 is an MSS `lb_setup` could not read.
    let opt = if ts(c.options) { TS_OPTION } else { 0 };
    if hs.mss == 0 || hc.mss == 0 || c.advmss + opt > hs.mss || s.advmss + opt > hc.mss {
        return Err(Kept::Mss);
    }
    Ok(ts(c.options))
}

/// Waits for a moment when nothing lb took from either peer is on its way
/// to the other.
async fn quiet(j: &Joining<'_>) -> Result<(), Kept> {
    let deadline = tokio::time::Instant::now() + QUIET_WITHIN;
    for i in 0.. {
        if settled(j)? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Kept::Busy);
        }
        pause(i).await;
    }
    Err(Kept::Busy)
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

/// Waits until lb's sockets have delivered everything they took before the
/// join, forwarding a FIN one of them got; `Some(side)` if `side` reset
/// (the reset reached lb's socket, or the program held it back): the bytes
/// it sent before are delivered first, as on a direct connection, then the
/// caller has the reset reach the other side.
async fn custody(flows: &Mutex<FlowMaps>, j: &Joining<'_>, keys: [FlowKey; 2], hs: [&Handshake; 2]) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + CUSTODY_WITHIN;
    let mut shut = [false; 2];
    let mut reset = None;
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
            if held[side].is_some_and(|f| f.deferred & 2 != 0) || state == CLOSE {
                reset.get_or_insert(side);
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
            let end = hs[to].snd_base.wrapping_add(sent as u32);
            let acked = held[to].is_some_and(|f| f.ack_seen != 0 && end.wrapping_sub(f.ack_seen) as i32 <= 0);
            if queued != 0 && !acked {
                done = false;
            }
        }
        if done {
            if reset.is_some() {
                return reset;
            }
            if shut != [false; 2] {
                let mut f = lock(flows);
                for (side, k) in keys.iter().enumerate() {
                    if shut[1 - side]
                        && let Some(now) = f.get(k)
                    {
                        // The program did not see that FIN pass: it is this
                        // direction's all the same, for the end.
                        let _ = f.put_one(*k, Flow { fin: 1, ..now });
                    }
                }
            }
            return None;
        }
        if tokio::time::Instant::now() >= deadline {
            log::warn!("packet plane: connection {}: lb's sockets did not deliver within {CUSTODY_WITHIN:?}", j.id);
            return reset;
        }
        pause(i).await;
    }
    reset
}

/// `tcpi_state`s: reset; a FIN received (in the states it leads to).
const CLOSE: u8 = 7;
const TIME_WAIT: u8 = 6;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// Both directions with their addresses, nothing joined yet.
fn base(j: &Joining<'_>) -> [Flow; 2] {
    let e = &j.ends;
    let now = sys::monotonic_coarse_ns();
    let base = Flow {
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

/// The two directions, joined, from the handshakes `[client socket's,
/// server socket's]`, lb's `header` to the server, the sockets' window
/// scales (`(peer's, own)`) and, with timestamps, their TSvals now.
fn joined(
    mut f: [Flow; 2],
    [c, s]: [&Handshake; 2],
    header: u64,
    ws: [(u8, u8); 2],
    ts_now: Option<[u32; 2]>,
) -> [Flow; 2] {
    let header = header as u32;
    let [to_server, to_client] = &mut f;
    // The client's byte k (its seq c.rcv_base + k toward lb) is the
    // server's byte header + k (lb's server socket's s.snd_base + header
    // + k); the server's byte k is the client's byte k.
    to_server.seq_add = s.snd_base.wrapping_add(header).wrapping_sub(c.rcv_base);
    to_server.ack_add = s.rcv_base.wrapping_sub(c.snd_base);
    to_client.seq_add = c.snd_base.wrapping_sub(s.rcv_base);
    to_client.ack_add = c.rcv_base.wrapping_sub(s.snd_base.wrapping_add(header));
    // Windows: the client's are in units of its scale (lb's client socket
    // reads them with its peer's); the server reads lb's server socket's
    // windows with the scale that socket announced.
    (to_server.win_in, to_server.win_out) = (ws[0].0, ws[1].1);
    (to_client.win_in, to_client.win_out) = (ws[1].0, ws[0].1);
    if let Some([c_now, s_now]) = ts_now {
        // Each peer's TSvals continue those of the socket it talked to,
        // from a little ahead of where that socket's stand now (anchored by
        // the peer's TSval of its handshake, older than any it sends
        // later); its echoes go back exactly.
        to_server.tsval_add = s_now.wrapping_add(TS_MARGIN).wrapping_sub(c.peer_tsval);
        to_client.tsval_add = c_now.wrapping_add(TS_MARGIN).wrapping_sub(s.peer_tsval);
        to_server.tsecr_add = to_client.tsval_add.wrapping_neg();
        to_client.tsecr_add = to_server.tsval_add.wrapping_neg();
    }
    for d in &mut f {
        d.state = JOINED;
        d.custody = 1;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(snd_base: u32, rcv_base: u32, peer_tsval: u32) -> Handshake {
        Handshake { snd_base, rcv_base, peer_tsval, mss: 1460 }
    }

    #[test]
    fn offsets_map_each_stream_onto_the_other() {
        // The client socket's stream starts at 1000, the client's at 5000;
        // the server socket's at 90_000 (a 10-byte header first), the
        // server's at u32::MAX - 2 (it wraps).
        let (c, s) = (hs(1000, 5000, 100), hs(90_000, u32::MAX - 2, 200));
        let [to_s, to_c] = joined([Flow::default(); 2], [&c, &s], 10, [(7, 9), (6, 7)], Some([400, 7_000_000]));
        // The client's byte 42 is the server's byte 52 (after the header).
        assert_eq!(5042u32.wrapping_add(to_s.seq_add), 90_052);
        // The client acknowledging lb's client stream up to byte 3 acks
        // the server's stream up to byte 3 (across the wrap).
        assert_eq!(1003u32.wrapping_add(to_s.ack_add), (u32::MAX - 2).wrapping_add(3));
        assert_eq!((u32::MAX - 2).wrapping_add(3).wrapping_add(to_c.seq_add), 1003);
        assert_eq!(90_052u32.wrapping_add(to_c.ack_add), 5042);
        // A TSval the client sends goes out ahead of lb's server socket's,
        // and its echo comes back as the client sent it.
        let out = 150u32.wrapping_add(to_s.tsval_add);
        assert_eq!(out, 7_000_000 + TS_MARGIN + 50);
        assert_eq!(out.wrapping_add(to_c.tsecr_add), 150);
        let back = 250u32.wrapping_add(to_c.tsval_add);
        assert_eq!(back.wrapping_add(to_s.tsecr_add), 250);
        assert_eq!((to_s.win_in, to_s.win_out, to_c.win_in, to_c.win_out), (7, 7, 6, 9));
        assert_eq!((to_s.state, to_c.state, to_s.custody, to_c.custody), (JOINED, JOINED, 1, 1));
    }

    #[test]
    fn what_cannot_be_translated_keeps_the_connection() {
        // lb's sockets' advmss: their MSS of 1460 less the timestamp option.
        let i = |options, advmss| Info { options, wscale: (7, 7), advmss: advmss - TS_OPTION };
        let (h, h0) = (hs(0, 0, 5), hs(0, 0, 0));
        assert_eq!(check(&i(7, 1460), &i(7, 1460), &h, &h), Ok(true));
        let no_ts = Info { options: 6, wscale: (7, 7), advmss: 1460 };
        assert_eq!(check(&no_ts, &Info { ..no_ts }, &h0, &h0), Ok(false));
        assert_eq!(check(&i(7, 1460), &i(6, 1460), &h, &h), Err(Kept::Timestamps));
        assert_eq!(check(&i(7, 1460), &i(7, 1460), &h0, &h), Err(Kept::Timestamps));
        assert_eq!(check(&i(7, 1460), &i(7 | TCPI_OPT_USEC_TS, 1460), &h, &h), Err(Kept::Timestamps));
        let small = Handshake { mss: 1400, ..h };
        assert_eq!(check(&i(7, 1460), &i(7, 1460), &h, &small), Err(Kept::Mss));
    }
}
