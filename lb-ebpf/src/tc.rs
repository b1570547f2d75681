//! The packet plane (TC ingress): a packet of a joined connection is
//! rewritten into the other connection, so the client and the server talk
//! to each other through lb's addresses while lb keeps no socket.
//!
//! A packet whose addresses and ports are a key of `LB_FLOWS` (the
//! client's, to lb's frontend address; or the server's, to lb's source
//! address) gets the other connection's addresses and ports, its sequence
//! and acknowledgment numbers moved by the join's offsets, its SACK block
//! edges and timestamps likewise, its window rescaled where the two
//! connections' window scales differ, and both checksums updated
//! incrementally. It then goes on up this host's stack (loopback: the
//! other connection's socket is local).
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
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    packet::{END_FIN, END_RST, Flow, FlowKey, JOINED, PacketCounters, PacketEnd, TURN},
    stats::COUNTERS_KEY,
};

use crate::maps::{LB_FLOW_CTL, LB_FLOWS, LB_PACKET_ENDS, LB_PKT_COUNTERS, LB_PKT_SCRATCH};

/// What the program returns for every packet it lets go on: the next
/// program on the hook (tcx's `TCX_NEXT`, classic tc's "continue"), then
/// the stack. Other programs may share the hook: another lb instance's
/// (with its own flows), another tool's. `TC_ACT_OK` would end the chain.
const PASS: i32 = TC_ACT_UNSPEC;
const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// `bpf_l4_csum_replace` flag: the field is part of the pseudo header.
const PSEUDO: u64 = 0x10;
/// TCP option kinds.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TS: u8 = 8;
/// Options walked at most (40 bytes of options hold far fewer in practice:
/// Linux sends NOP, NOP, timestamps, and NOP, NOP, SACK).
const MAX_OPTIONS: usize = 8;
/// SACK blocks in one option at most.
const MAX_SACK_BLOCKS: u32 = 4;

#[classifier]
pub fn lb_packet(ctx: TcContext) -> i32 {
    match try_packet(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// `T` at `off` in the packet, if the packet's linear part is that long.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

fn count(f: impl FnOnce(&mut PacketCounters)) {
    if let Some(c) = LB_PKT_COUNTERS.get_ptr_mut(COUNTERS_KEY) {
        // SAFETY: per-CPU slot, valid for the program's run.
        f(unsafe { &mut *c });
    }
}

/// An IPv4 address (as it sits in the packet) as the 16 bytes of
/// `::ffff:a.b.c.d`. Built as words: a byte array is filled by a loop the
/// verifier refuses without `CAP_PERFMON`.
#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let words: [u32; 4] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4];
    // SAFETY: [u32; 4] and [u8; 16] have the same size, and any bytes are valid u8s.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// The IPv4 address of a mapped address, as it sits in a packet.
#[inline(always)]
fn ip4_of(a: &[u8; 16]) -> u32 {
    // SAFETY: as `mapped`, the other way.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*a) };
    words[3]
}

/// Where a packet's TCP header and options are.
struct Tcp {
    /// Offset of the TCP header.
    at: usize,
    flags: u8,
    payload: u64,
    /// Offset of the timestamp option's TSval (0: none).
    ts: usize,
    /// Offset of the first SACK block (0: none), and how many.
    sack: usize,
    sack_n: u32,
}

/// Finds the timestamp and SACK options (read only; nothing is changed).
#[inline(always)]
fn options(ctx: &TcContext, t: usize, hlen: usize) -> (usize, usize, u32) {
    let end = t + hlen;
    let mut p = t + 20;
    let (mut ts, mut sack, mut sack_n) = (0usize, 0usize, 0u32);
    for _ in 0..MAX_OPTIONS {
        if p >= end {
            break;
        }
        // Kind and length read together: a one-byte read at a variable
        // offset compiles to a bounds check the verifier cannot use (it
        // learns nothing from `p >= data_end`). The last byte of the
        // options alone can only be a NOP or the end.
        let Some([kind, len]) = read::<[u8; 2]>(ctx, p) else { break };
        if kind == OPT_END {
            break;
        }
        if kind == OPT_NOP {
            p += 1;
            continue;
        }
        let len = usize::from(len);
        if len < 2 || p + len > end {
            break;
        }
        if kind == OPT_TS && len == 10 {
            ts = p + 2;
        } else if kind == OPT_SACK && len >= 10 && (len - 2) % 8 == 0 {
            sack = p + 2;
            sack_n = ((len - 2) / 8) as u32;
        }
        p += len;
    }
    (ts, sack, sack_n)
}

/// The options' offsets, through the per-CPU scratch slot: each path of the
/// option walk leaves different exact values, and the verifier would
/// follow every one of them through the rewrite; read back from a map
/// they are just bounded numbers, and the paths merge.
#[inline(always)]
fn launder((ts, sack, sack_n): (usize, usize, u32)) -> (usize, usize, u32) {
    let Some(p) = LB_PKT_SCRATCH.get_ptr_mut(COUNTERS_KEY) else { return (0, 0, 0) };
    // SAFETY: per-CPU slot, valid for the program's run; nothing else runs
    // on this CPU meanwhile (TC programs run with preemption off).
    unsafe {
        core::ptr::write_volatile(p, [ts as u32, sack as u32, sack_n, 0]);
        let [ts, sack, sack_n, _] = core::ptr::read_volatile(p);
        // Bounds the verifier can check the packet reads against.
        ((ts & 0x3ff) as usize, (sack & 0x3ff) as usize, sack_n & 7)
    }
}

fn try_packet(ctx: &TcContext) -> Result<i32, i32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(ETH_P_IP) {
        return Ok(PASS);
    }
    let vihl: u8 = read(ctx, ETH_LEN).ok_or(PASS)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || read::<u8>(ctx, ETH_LEN + 9) != Some(IPPROTO_TCP) {
        return Ok(PASS);
    }
    // A fragment is no packet of a joined flow (lb's connections set DF).
    let frag: u16 = read(ctx, ETH_LEN + 6).ok_or(PASS)?;
    if u16::from_be(frag) & 0x3fff != 0 {
        return Ok(PASS);
    }
    let saddr: u32 = read(ctx, ETH_LEN + 12).ok_or(PASS)?;
    let daddr: u32 = read(ctx, ETH_LEN + 16).ok_or(PASS)?;
    let t = ETH_LEN + ihl;
    let sport: u16 = read(ctx, t).ok_or(PASS)?;
    let dport: u16 = read(ctx, t + 2).ok_or(PASS)?;
    let key = FlowKey { src: mapped(saddr), dst: mapped(daddr), sport, dport, _pad: 0 };
    let Some(flow) = LB_FLOWS.get_ptr_mut(&key) else { return Ok(PASS) };
    let doff: u8 = read(ctx, t + 12).ok_or(PASS)?;
    let hlen = usize::from(doff >> 4) * 4;
    let flags: u8 = read(ctx, t + 13).ok_or(PASS)?;
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
    let headers = (ETH_LEN + ihl + hlen) as u64;
    let tcp = Tcp { at: t, flags, payload: u64::from(ctx.len()).saturating_sub(headers), ts, sack, sack_n };
    // SAFETY: map value pointer valid for the program's run.
    match unsafe { (*flow).state } {
        JOINED => {}
        TURN => return turn(ctx, flow, t, flags),
        _ => return Ok(PASS),
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
    rewrite(ctx, &f, &tcp, saddr, daddr, sport, dport)?;
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
    Ok(PASS)
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

/// Writes `to` over the `N`-byte field at `off` that holds `from`, and
/// updates the TCP checksum (`pseudo`: the field is in its pseudo header).
#[inline(always)]
fn put<T: Copy + Into<u32>>(ctx: &TcContext, csum: usize, off: usize, from: T, to: T, pseudo: bool) -> Result<(), i32> {
    let size = core::mem::size_of::<T>() as u64;
    ctx.store(off, &to, 0).map_err(|_| TC_ACT_SHOT)?;
    let flags = size | if pseudo { PSEUDO } else { 0 };
    ctx.l4_csum_replace(csum, u64::from(from.into()), u64::from(to.into()), flags).map_err(|_| TC_ACT_SHOT)
}

/// Moves the 32-bit field at `off` (network order) by `add`.
#[inline(always)]
fn shift_field(ctx: &TcContext, csum: usize, off: usize, add: u32) -> Result<(), i32> {
    let old: u32 = read(ctx, off).ok_or(TC_ACT_SHOT)?;
    let new = u32::from_be(old).wrapping_add(add).to_be();
    put(ctx, csum, off, old, new, false)
}

/// Rewrites the packet in place into the other connection. A packet the
/// program cannot finish rewriting is dropped (its sender sends it again),
/// never delivered half rewritten.
#[inline(always)]
fn rewrite(ctx: &TcContext, f: &Flow, tcp: &Tcp, saddr: u32, daddr: u32, sport: u16, dport: u16) -> Result<(), i32> {
    let t = tcp.at;
    let csum = t + 16;
    let (nsrc, ndst) = (ip4_of(&f.src), ip4_of(&f.dst));
    // Addresses: the IP header's checksum and the TCP pseudo header.
    ctx.store(ETH_LEN + 12, &nsrc, 0).map_err(|_| TC_ACT_SHOT)?;
    ctx.l3_csum_replace(ETH_LEN + 10, u64::from(saddr), u64::from(nsrc), 4).map_err(|_| TC_ACT_SHOT)?;
    ctx.l4_csum_replace(csum, u64::from(saddr), u64::from(nsrc), 4 | PSEUDO).map_err(|_| TC_ACT_SHOT)?;
    ctx.store(ETH_LEN + 16, &ndst, 0).map_err(|_| TC_ACT_SHOT)?;
    ctx.l3_csum_replace(ETH_LEN + 10, u64::from(daddr), u64::from(ndst), 4).map_err(|_| TC_ACT_SHOT)?;
    ctx.l4_csum_replace(csum, u64::from(daddr), u64::from(ndst), 4 | PSEUDO).map_err(|_| TC_ACT_SHOT)?;
    put(ctx, csum, t, sport, f.sport, false)?;
    put(ctx, csum, t + 2, dport, f.dport, false)?;
    if f.seq_add != 0 {
        shift_field(ctx, csum, t + 4, f.seq_add)?;
    }
    if tcp.flags & ACK != 0 && f.ack_add != 0 {
        shift_field(ctx, csum, t + 8, f.ack_add)?;
    }
    if f.win_in != f.win_out {
        let old: u16 = read(ctx, t + 14).ok_or(TC_ACT_SHOT)?;
        let bytes = u64::from(u16::from_be(old)) << (f.win_in & 15);
        // A window that is not zero never becomes zero: that would stop the
        // sender until its persist timer fires. A little more than there is
        // costs at most a retransmission.
        let units = (bytes >> (f.win_out & 15)).max(u64::from(bytes != 0));
        let new = (units.min(0xffff) as u16).to_be();
        put(ctx, csum, t + 14, old, new, false)?;
    }
    if tcp.ts != 0 {
        if f.tsval_add != 0 {
            shift_field(ctx, csum, tcp.ts, f.tsval_add)?;
        }
        if f.tsecr_add != 0 && tcp.flags & ACK != 0 {
            shift_field(ctx, csum, tcp.ts + 4, f.tsecr_add)?;
        }
    }
    if tcp.sack != 0 && f.ack_add != 0 {
        for k in 0..MAX_SACK_BLOCKS {
            if k >= tcp.sack_n {
                break;
            }
            let at = tcp.sack + 8 * k as usize;
            shift_field(ctx, csum, at, f.ack_add)?;
            shift_field(ctx, csum, at + 4, f.ack_add)?;
        }
    }
    Ok(())
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
