//! The packet plane (TC ingress): a packet of a joined connection is
//! rewritten into the other connection, so the client and the server talk
//! to each other through lb's addresses while lb keeps no socket.
//!
//! A packet whose addresses and ports are a key of `LB_FLOWS` (the
//! client's, to lb's frontend address; or the server's, to lb's source
//! address) gets the other connection's addresses and ports, its sequence
//! and acknowledgment numbers moved by the join's offsets, its SACK block
//! edges and timestamps likewise, its window rescaled where the two
//! connections' window scales differ, and its checksums updated
//! incrementally (IPv4's header and TCP's; IPv6 has only TCP's, and a
//! packet with extension headers is not one of lb's). It then goes on up this host's stack when the peer is
//! local (loopback), or out of the interface toward the peer
//! (`Flow::ifindex`, the interface the peer's handshake came in on, which
//! the program recorded in `LB_ARRIVALS`).
//!
//! Nothing is ever dropped to make the join: bytes that reached lb's
//! sockets before it are delivered by them (their "custody"), and the
//! peer's later bytes, rewritten, may overtake them: the receiver queues
//! what is ahead of its stream (a FIN too) until the gap is filled, as
//! after any reordering. A reset is not queued: the program passes one
//! only where it lands exactly on what its receiver has taken
//! (`reset_is_exact`).
//!
//! The program follows the end: both FINs, or a reset, are reported once
//! to the slot's holder (`LB_PACKET_ENDS`). A SYN on a flow's addresses is
//! a new connection reusing them: the flow is removed and the SYN passes.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    packet::{END_FIN, END_RST, Flow, FlowKey, JOINED, PacketCounters, PacketEnd, TURN},
    stats::COUNTERS_KEY,
};

use fields::{ACK, Addrs, ETH_LEN, FIN, RST, SYN, Tcp, bytes, launder, mapped, options, put, read, rewrite};

use crate::{
    maps::{LB_ARRIVALS, LB_FLOW_CTL, LB_FLOWS, LB_PACKET_ENDS, LB_PKT_COUNTERS},
    sock_ops::frontend_ns,
};

mod fields;
mod icmp;

/// What the program returns for every packet it lets go on: the next
/// program on the hook (tcx's `TCX_NEXT`, classic tc's "continue"), then
/// the stack. Other programs may share the hook: another lb instance's
/// (with its own flows), another tool's. `TC_ACT_OK` would end the chain.
const PASS: i32 = TC_ACT_UNSPEC;
pub(super) const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub(super) const IPPROTO_TCP: u8 = 6;

#[classifier]
pub fn lb_packet(ctx: TcContext) -> i32 {
    match try_packet(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn count(f: impl FnOnce(&mut PacketCounters)) {
    if let Some(c) = LB_PKT_COUNTERS.get_ptr_mut(COUNTERS_KEY) {
        // SAFETY: per-CPU slot, valid for the program's run.
        f(unsafe { &mut *c });
    }
}

/// What the program reads of every packet before it looks it up.
struct Headers {
    addrs: Addrs,
    /// Offset of the TCP header.
    t: usize,
    sport: u16,
    dport: u16,
    flags: u8,
}

impl Headers {
    fn key(&self) -> FlowKey {
        FlowKey {
            src: bytes(self.addrs.src),
            dst: bytes(self.addrs.dst),
            sport: self.sport,
            dport: self.dport,
            _pad: 0,
        }
    }
}

/// The addresses, ports and flags of a TCP packet: IPv4 and not a
/// fragment, or IPv6 with TCP right after its header (lb's connections
/// carry no extension headers); `None` for any other packet.
#[inline(always)]
fn headers(ctx: &TcContext) -> Option<Headers> {
    let proto = read::<u16>(ctx, 12).map(u16::from_be)?;
    let (addrs, t) = if proto == ETH_P_IP {
        let vihl: u8 = read(ctx, ETH_LEN)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 || read::<u8>(ctx, ETH_LEN + 9) != Some(IPPROTO_TCP) {
            return None;
        }
        // A fragment is no packet of a joined flow (lb's connections set DF).
        let frag: u16 = read(ctx, ETH_LEN + 6)?;
        if u16::from_be(frag) & 0x3fff != 0 {
            return None;
        }
        let (src, dst) = (read(ctx, ETH_LEN + 12)?, read(ctx, ETH_LEN + 16)?);
        (Addrs { v6: false, src: mapped(src), dst: mapped(dst) }, ETH_LEN + ihl)
    } else if proto == ETH_P_IPV6 {
        if read::<u8>(ctx, ETH_LEN + 6) != Some(IPPROTO_TCP) {
            return None;
        }
        (Addrs { v6: true, src: addr6(ctx, ETH_LEN + 8)?, dst: addr6(ctx, ETH_LEN + 24)? }, ETH_LEN + 40)
    } else {
        return None;
    };
    Some(Headers { addrs, t, sport: read(ctx, t)?, dport: read(ctx, t + 2)?, flags: read(ctx, t + 13)? })
}

/// The IPv6 address at `off`, as words: read one word at a time (a
/// 16-byte value would be zeroed first by a byte loop, which the verifier
/// refuses without `CAP_PERFMON`).
#[inline(always)]
fn addr6(ctx: &TcContext, off: usize) -> Option<[u32; 4]> {
    Some([read(ctx, off)?, read(ctx, off + 4)?, read(ctx, off + 8)?, read(ctx, off + 12)?])
}

/// Records the interface a handshake's packet arrived on, under the
/// packet's addresses: a client's SYN to a frontend, or a server's SYN-ACK
/// (to lb's source address; any SYN-ACK but lb's own from a frontend, as
/// lb's sources are not known here). The join sends each peer's packets
/// back out where that peer's handshake came in.
#[inline(always)]
fn arrived(ctx: &TcContext, key: &FlowKey, h: &Headers) {
    let frontend = |addr: [u32; 4], port: u16| {
        let port = u16::from_be(port);
        frontend_ns(addr, port).or_else(|| frontend_ns([0; 4], port)).is_some()
    };
    // A SYN to a frontend; a SYN-ACK not from one (on loopback, lb's own
    // answers to its clients come in here too, and would crowd the map).
    let wanted = if h.flags & ACK == 0 { frontend(h.addrs.dst, h.dport) } else { !frontend(h.addrs.src, h.sport) };
    if !wanted {
        return;
    }
    // SAFETY: the context's socket buffer, valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let _ = LB_ARRIVALS.insert(key, &ifindex, 0);
}

fn try_packet(ctx: &TcContext) -> Result<i32, i32> {
    let Some(h) = headers(ctx) else { return icmp::icmp4(ctx) };
    let key = h.key();
    let Headers { ref addrs, t, sport, dport, flags } = h;
    if flags & SYN != 0 {
        arrived(ctx, &key, &h);
    }
    let Some(flow) = LB_FLOWS.get_ptr_mut(&key) else { return Ok(PASS) };
    let doff: u8 = read(ctx, t + 12).ok_or(PASS)?;
    let hlen = usize::from(doff >> 4) * 4;
    if flags & SYN != 0 {
        // A new connection on the addresses of a flow that ended (or a
        // stray): the flow is over, the SYN goes to the stack.
        // SAFETY: map value pointer valid for the program's run.
        let (rkey, id) = unsafe { ((*flow).reverse_key(), (*flow).id) };
        let _ = LB_FLOWS.remove(&key);
        let _ = LB_FLOWS.remove(&rkey);
        let _ = LB_FLOW_CTL.remove(&id);
        count(|c| c.syn_reuse += 1);
        return Ok(PASS);
    }
    if hlen < 20 {
        return Ok(PASS);
    }
    let (ts, sack, sack_n) = launder(options(ctx, t, hlen));
    let tcp = Tcp { at: t, flags, payload: u64::from(ctx.len()).saturating_sub((t + hlen) as u64), ts, sack, sack_n };
    // SAFETY: map value pointer valid for the program's run.
    match unsafe { (*flow).state } {
        JOINED => {}
        TURN => return turn(ctx, flow, t, flags),
        _ => return Ok(PASS),
    }
    if !paired(flow) {
        return Ok(PASS);
    }
    if flags & ACK != 0
        && let Some(ack) = read::<u32>(ctx, t + 8)
    {
        let ack = u32::from_be(ack);
        // SAFETY: as above; a lost race between two CPUs keeps an older
        // value, which only makes lb wait a packet longer.
        unsafe {
            if (*flow).ack_seen == 0 || (ack.wrapping_sub((*flow).ack_seen) as i32) > 0 {
                (*flow).ack_seen = ack;
            }
        }
    }
    // SAFETY: map value pointer valid for the program's run; copied out
    // once, so the rewrite reads a consistent view.
    let f = unsafe { *flow };
    let ctl = if flags & (FIN | RST) != 0 { LB_FLOW_CTL.get_ptr(&f.id) } else { None };
    // SAFETY: map value pointer valid for the program's run.
    let ctl = ctl.map(|c| unsafe { *c }).unwrap_or_default();
    // The receiver's entries of `ctl` (the client's are first). Values
    // picked, not indexed: the verifier refuses a variable offset into
    // the stack.
    let (acked, fin_other) = if f.client != 0 { (ctl.acked[1], ctl.fin[1]) } else { (ctl.acked[0], ctl.fin[0]) };
    if flags & RST != 0 {
        let to = read::<u32>(ctx, t + 4).map_or(0, |s| u32::from_be(s).wrapping_add(f.seq_add));
        // While lb's sockets deliver, any reset would overtake them.
        if ctl.custody != 0 || !reset_is_exact(&f, to, acked) {
            // SAFETY: as above.
            unsafe {
                if (*flow).deferred == 0 || (to.wrapping_sub((*flow).rst_seq) as i32) > 0 {
                    (*flow).rst_seq = to;
                }
                (*flow).deferred = 2;
            }
            count(|c| c.deferred += 1);
            return Err(TC_ACT_SHOT);
        }
    }
    rewrite(ctx, &f, &tcp, addrs, sport, dport)?;
    // SAFETY: map value pointer valid for the program's run.
    unsafe {
        (*flow).bytes += tcp.payload;
        (*flow).packets += 1;
        (*flow).last_ns = bpf_ktime_get_coarse_ns();
    }
    count(|c| {
        c.rewritten += 1;
        c.bytes += tcp.payload;
        c.sack_blocks += u64::from(if tcp.sack != 0 { tcp.sack_n } else { 0 });
    });
    if flags & RST != 0 {
        // SAFETY: as above.
        unsafe { (*flow).rst = 1 };
        end(flow, &f, END_RST);
    } else if flags & FIN != 0 && f.fin == 0 {
        // SAFETY: as above.
        unsafe { (*flow).fin = 1 };
        let rkey = f.reverse_key();
        // The other way's FIN: seen by the program, or delivered by lb's socket.
        // SAFETY: map value pointer valid for the program's run.
        if fin_other != 0 || LB_FLOWS.get_ptr(&rkey).is_some_and(|r| unsafe { (*r).fin } != 0) {
            end(flow, &f, END_FIN);
        }
    }
    if f.ifindex != 0 {
        // The peer is behind another interface (or this one): out toward
        // it, its link-layer address from the neighbour table.
        count(|c| c.redirected += 1);
        // SAFETY: a helper on the context's packet; no parameters.
        return Ok(unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(PASS)
}

/// Whether both directions of `flow`'s connection are in `LB_FLOWS`. lb
/// writes the two entries with one `bpf()`, but the kernel writes them one
/// after the other (`generic_map_update_batch`, which may even reschedule
/// between them): rewriting one direction while the other's packets still
/// reach lb's socket would hand that socket acknowledgments of bytes it
/// never sent, and it drops such segments with their data. Until both are
/// in, both directions' packets go to lb's sockets, as before the join;
/// the second write joins them at once. Found once, the pairing is kept
/// in the flow and not looked up again.
#[inline(always)]
fn paired(flow: *mut Flow) -> bool {
    // SAFETY: map value pointer valid for the program's run.
    let (done, id, rkey) = unsafe { ((*flow).paired, (*flow).id, (*flow).reverse_key()) };
    if done != 0 {
        return true;
    }
    // SAFETY: as above.
    let both = LB_FLOWS.get_ptr(&rkey).is_some_and(|r| unsafe { (*r).state == JOINED && (*r).id == id });
    if both {
        // SAFETY: as above.
        unsafe { (*flow).paired = 1 };
    }
    both
}

/// Egress, on interfaces other than loopback: lb's own reset toward a live
/// peer leaves through here ([`turn`]); on loopback the ingress program
/// sees it. Every other packet passes untouched after a look at its flags.
#[classifier]
pub fn lb_packet_out(ctx: TcContext) -> i32 {
    let Some(h) = headers(&ctx) else { return PASS };
    if h.flags & RST == 0 {
        return PASS;
    }
    let Some(entry) = LB_FLOWS.get_ptr_mut(&h.key()) else { return PASS };
    // SAFETY: map value pointer valid for the program's run.
    if unsafe { (*entry).state } != TURN {
        return PASS;
    }
    match turn(&ctx, entry, h.t, h.flags) {
        Ok(v) | Err(v) => v,
    }
}

/// Whether a reset, rewritten, lands exactly where its receiver is: its
/// sequence number is the last acknowledgment the receiver sent (as the
/// program saw it go the other way, or `acked`: as lb's socket had it
/// when the custody ended). Only such a reset is passed. One
/// further ahead would overtake bytes still on their way, and lb's sockets
/// may hold some of them until they deliver: the receiver would take the
/// reset without them (after a challenge ACK, RFC 5961). Held back, it
/// costs nothing: the receiver acknowledges those bytes as they arrive,
/// the acknowledgment goes to the sender's stack, which has no socket any
/// more and answers with a reset exactly there, and that one passes; and
/// once lb's sockets have delivered, lb has its own socket reset the peer
/// where the held reset's sequence (`rst_seq`) says ([`turn`]).
#[inline(always)]
fn reset_is_exact(f: &Flow, to: u32, acked: u32) -> bool {
    if acked != 0 && to == acked {
        return true;
    }
    // SAFETY: map value pointer valid for the program's run.
    LB_FLOWS.get_ptr(&f.reverse_key()).is_some_and(|r| unsafe { (*r).ack_seen } == to)
}

/// A packet of lb's own socket toward a live peer whose other side reset
/// while lb's sockets still delivered (see [`TURN`]): lb closes that
/// socket abortively once the peer has everything, and its reset is moved
/// to where the dead side's stream ends (`seq_add`), which is exactly
/// where the peer stands. The connection's end is reported then.
#[inline(always)]
fn turn(ctx: &TcContext, entry: *mut Flow, t: usize, flags: u8) -> Result<i32, i32> {
    if flags & RST == 0 {
        return Ok(PASS);
    }
    // SAFETY: map value pointer valid for the program's run.
    let e = unsafe { *entry };
    let old: u32 = read(ctx, t + 4).ok_or(TC_ACT_SHOT)?;
    put(ctx, t + 16, t + 4, old, e.seq_add.to_be(), false)?;
    // SAFETY: as above.
    unsafe { (*entry).ended = 1 };
    // The entry's key is the dead side's flow's rewritten addresses: its
    // reverse is the live peer's flow, whose reverse is the dead side's.
    let Some(live) = LB_FLOWS.get_ptr(&e.reverse_key()) else { return Ok(PASS) };
    // SAFETY: as above.
    let dead_key = unsafe { (*live).reverse_key() };
    if let Some(dead) = LB_FLOWS.get_ptr_mut(&dead_key) {
        // SAFETY: as above.
        let d = unsafe {
            (*dead).rst = 1;
            *dead
        };
        end(dead, &d, END_RST);
    }
    count(|c| c.turned += 1);
    Ok(PASS)
}

/// Reports the end of the connection `flow` belongs to, once (both
/// directions are marked), to its slot's holder.
#[inline(always)]
fn end(flow: *mut Flow, f: &Flow, how: u32) {
    if f.ended != 0 {
        return;
    }
    let rkey = f.reverse_key();
    let rev = LB_FLOWS.get_ptr_mut(&rkey);
    // SAFETY: map value pointers valid for the program's run.
    let (rb, rp) = unsafe {
        (*flow).ended = 1;
        match rev {
            Some(r) => {
                (*r).ended = 1;
                ((*r).bytes, (*r).packets)
            }
            None => (0, 0),
        }
    };
    // SAFETY: as above.
    let (b, p) = unsafe { ((*flow).bytes, (*flow).packets) };
    let (bytes, packets) = if f.client != 0 { ([b, rb], [p, rp]) } else { ([rb, b], [rp, p]) };
    let ev = PacketEnd {
        id: f.id,
        bytes,
        packets,
        start_ns: f.start_ns,
        // SAFETY: a helper without arguments.
        end_ns: unsafe { bpf_ktime_get_coarse_ns() },
        how,
        _pad: 0,
    };
    let sent = LB_PACKET_ENDS.get(u32::from(f.slot)).is_some_and(|ring| ring.output(&ev, 0).is_ok());
    count(|c| {
        c.ended += u64::from(sent);
        c.ends_lost += u64::from(!sent);
    });
}
