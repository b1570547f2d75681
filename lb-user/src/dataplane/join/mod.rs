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
//! 3. **Join.** Both directions go into `LB_FLOWS` joined (one `bpf()`;
//!    the program rewrites a direction only once the other's entry is
//!    there too, so the second write joins both at once): from then on
//!    the program rewrites every packet of either peer into the other
//!    connection. Nothing is dropped: a packet the program let
//!    pass just before still reaches lb's socket (lb waits a grace period
//!    for it, see [`Grace`]), and bytes that reached lb's sockets are
//!    still delivered by them ("custody"); a peer's later bytes and FIN,
//!    rewritten, may overtake them, and its receiver queues them until
//!    the gap is filled, as after any reordering.
//!    A reset is not queued: the program passes none while lb's sockets
//!    deliver, and then only one that lands exactly where its receiver
//!    stands. lb waits until each peer has acknowledged all lb's socket
//!    sent it, forwards a FIN that reached its sockets before the join,
//!    and, if one side reset, resets the other from its own socket, moved
//!    by the program to where the dead side's stream ends.
//! 4. **Close.** Both sockets go into repair mode and are closed: the
//!    kernel sends neither FIN nor RST, and the peers never notice.

use std::{
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::Duration,
};

use lb_common::packet::{Flow, FlowCtl, FlowKey, Handshake, JOINED};

use crate::{
    addr::ip16,
    kernel::{
        flows::FlowMaps,
        grace::Grace,
        sys::{self, TCPI_OPT_TIMESTAMPS, TCPI_OPT_USEC_TS},
    },
};

/// How long lb waits for a quiet moment before it leaves a connection on
/// sockmap. A request and its answer at the start of a connection pass
/// within a round trip, but on a loaded host a peer may take long to
/// answer: the looks grow further apart (up to [`QUIET_LOOK_MAX`]), so a
/// sender that never pauses costs about a hundred looks.
const QUIET_WITHIN: Duration = Duration::from_secs(1);
/// The longest gap between two looks for a quiet moment.
const QUIET_LOOK_MAX: Duration = Duration::from_millis(32);
/// Milliseconds a translated TSval is moved ahead of the clock of lb's
/// socket it continues. lb's socket may still send a segment after the
/// join (a delayed ACK, a window update) that overtakes a peer's segment
/// sent before it; the receiver takes the newer TSval and drops a segment
/// more than a tick older (PAWS), and if the peer then resets, that
/// segment is lost. Ahead by this much, a peer's segment is dropped only
/// if it spent longer on its way. Ahead costs nothing: a receiver takes
/// newer TSvals from translated segments only once it has all lb's socket
/// had to deliver (a segment beyond its left edge leaves its TSval record
/// alone), and lb's socket sends no data after that.
const TS_AHEAD: u32 = 64;
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
    /// The program would not see the connection's packets, or could not
    /// send them on: IPv4 on one side and IPv6 on the other, a handshake
    /// that came in on an interface
    /// without the program (one that appeared after lb started), or one
    /// peer on loopback and the other behind another interface.
    Path,
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
pub async fn join(flows: &Mutex<FlowMaps>, grace: &Grace, j: &Joining<'_>) -> Result<Joined, Kept> {
    let hs = {
        let mut f = lock(flows);
        j.cookies.map(|c| f.take_handshake(c))
    };
    let [Some(hc), Some(hsv)] = hs else { return Err(Kept::Map) };
    let e = &j.ends;
    let all = [e.client, e.local, e.source, e.server];
    if !all.iter().all(SocketAddr::is_ipv4) && !all.iter().all(SocketAddr::is_ipv6) {
        return Err(Kept::Path);
    }
    let keys = j.ends.keys();
    let out = path(&lock(flows), &keys)?;
    let (c, s) = (info(&j.socks[0])?, info(&j.socks[1])?);
    let timestamps = check(&c, &s, &hc, &hsv)?;
    quiet(j).await?;
    let offsets = if timestamps { Some(clocks(j.socks)?) } else { None };
    let mut flows_in = joined(base(j), [&hc, &hsv], j.header, [c.wscale, s.wscale], offsets);
    for (f, ifindex) in flows_in.iter_mut().zip(out) {
        f.ifindex = ifindex;
    }
    {
        let mut f = lock(flows);
        let custody = FlowCtl { custody: 1, ..FlowCtl::default() };
        let put = f.put_ctl(j.id, custody).and_then(|()| f.put(keys, flows_in));
        if let Err(e) = put {
            f.remove_of(j.id, &keys);
            log::debug!("packet plane: {e}");
            return Err(Kept::Map);
        }
    }
    // From here on the program rewrites every packet: the join cannot be
    // undone, only completed. A packet the program let pass just before
    // is still on its way to lb's socket: once a grace period has passed
    // it is in the socket or in its backlog, and taking the socket's lock
    // (setting an option) runs the backlog. Then the socket has received
    // everything it ever will.
    grace.wait().await;
    for s in j.socks {
        let _ = s.set_nodelay(true);
    }
    let d = custody::custody(flows, j, keys, [&hc, &hsv]).await;
    // lb's sockets have delivered. What the peers acknowledged of it
    // reached lb's sockets (from now on, the program sees it).
    let acked = |s: &TcpStream, base: u32, syn: u64| {
        sys::tcp_bytes_acked(s).map_or(0, |a| base.wrapping_add(a.saturating_sub(syn) as u32))
    };
    let lifted = FlowCtl {
        fin: [u8::from(d.shut[1]), u8::from(d.shut[0])],
        custody: 0,
        _pad: 0,
        acked: [acked(&j.socks[0], hc.snd_base, 0), acked(&j.socks[1], hsv.snd_base, 1)],
    };
    let _ = lock(flows).put_ctl(j.id, lifted);
    // A reset that came after the custody's last look was held back too,
    // until the lift: once every program run that began before it is over,
    // the flows show it.
    let reset = match d.reset {
        Some(r) => Some(r),
        None => {
            grace.wait().await;
            let f = lock(flows);
            (0..2).find(|&s| f.get(&keys[s]).is_some_and(|x| x.deferred != 0)).map(|s| (s, false))
        }
    };
    if let Some((side, by_socket)) = reset {
        custody::reset_live(flows, j, keys, side, by_socket, d.end[1 - side]).await;
    }
    for s in j.socks {
        let _ = sys::set_repair(s, true);
    }
    Ok(Joined::Carried)
}

/// Where each direction's rewritten packets leave, `[toward the server,
/// toward the client]`: back to this host's stack (0) when both peers'
/// handshakes came in on loopback, else out of the interface the peer's
/// handshake came in on. `Err` when the program did not see a handshake
/// (its interface has no program) or only one of them came in on
/// loopback.
fn path(f: &FlowMaps, [client, server]: &[FlowKey; 2]) -> Result<[u32; 2], Kept> {
    static LO: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let lo = *LO.get_or_init(|| sys::interface_index("lo"));
    let (Some(to_client), Some(to_server)) = (f.arrival(client), f.arrival(server)) else {
        return Err(Kept::Path);
    };
    match (Some(to_server) == lo, Some(to_client) == lo) {
        (true, true) => Ok([0, 0]),
        (false, false) => Ok([to_server, to_client]),
        _ => Err(Kept::Path),
    }
}

/// The offsets of the two sockets' timestamp clocks from the kernel's TCP
/// clock (CLOCK_MONOTONIC, milliseconds): every socket's TSvals are that
/// clock plus an offset of its own. Exact when the clock did not tick
/// between the reads around them.
fn clocks(socks: &[TcpStream; 2]) -> Result<[u32; 2], Kept> {
    let now = |s: &TcpStream| sys::tcp_timestamp(s).map_err(|_| Kept::Closed);
    let mut offsets = [0; 2];
    for _ in 0..4 {
        let before = sys::monotonic_ms();
        let ts = [now(&socks[0])?, now(&socks[1])?];
        offsets = ts.map(|t| t.wrapping_sub(before));
        if sys::monotonic_ms() == before {
            break;
        }
    }
    Ok(offsets)
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
/// to the other: then the custody has little to deliver. lb's sockets see
/// none of the peers' acknowledgments after the join (the program sends
/// them to the other peer), so a custody of a window of bytes would go at
/// the pace of retransmission timeouts: a sender that never pauses stays
/// on sockmap.
async fn quiet(j: &Joining<'_>) -> Result<(), Kept> {
    let deadline = tokio::time::Instant::now() + QUIET_WITHIN;
    for i in 0.. {
        if settled(j)? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Kept::Busy);
        }
        pause(i, QUIET_LOOK_MAX).await;
    }
    Err(Kept::Busy)
}

/// The `i`th pause between two checks: a yield to the runtime at first,
/// then a millisecond (the runtime's timer granularity), doubling up to
/// `longest`.
async fn pause(i: u32, longest: Duration) {
    if i < SPIN_CHECKS {
        tokio::task::yield_now().await;
    } else {
        let doubled = Duration::from_millis(1).saturating_mul(1 << (i - SPIN_CHECKS).min(16));
        tokio::time::sleep(doubled.min(longest)).await;
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
/// scales (`(peer's, own)`) and, with timestamps, their clocks' offsets
/// ([`clocks`]).
fn joined(
    mut f: [Flow; 2],
    [c, s]: [&Handshake; 2],
    header: u64,
    ws: [(u8, u8); 2],
    offsets: Option<[u32; 2]>,
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
    if let Some([c_off, s_off]) = offsets {
        // Each peer's TSvals go on in the clock of the socket it talked to,
        // never below it: a peer drops a segment whose TSval is more than
        // a tick below the last it took (PAWS), and a dropped segment of a
        // sender that then resets is lost. All clocks are the kernel's
        // TCP clock plus an offset per socket (the peers' too, on one
        // host). A peer's offset is at most its handshake TSval less the
        // time lb_setup read it (it was sent then or before), so the
        // translated TSvals stand at or ahead of the socket's clock: ahead
        // by how long the handshake's last packet took to reach lb_setup
        // (on one host, nothing), plus TS_AHEAD.
        let offset = |h: &Handshake| h.peer_tsval.wrapping_sub(h.at_ms);
        to_server.tsval_add = s_off.wrapping_sub(offset(c)).wrapping_add(TS_AHEAD);
        to_client.tsval_add = c_off.wrapping_sub(offset(s)).wrapping_add(TS_AHEAD);
        to_server.tsecr_add = to_client.tsval_add.wrapping_neg();
        to_client.tsecr_add = to_server.tsval_add.wrapping_neg();
    }
    for d in &mut f {
        d.state = JOINED;
    }
    f
}

mod custody;
#[cfg(test)]
mod tests;
