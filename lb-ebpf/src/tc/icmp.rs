//! ICMP errors about a joined connection (IPv4): a router between lb and
//! a peer says a segment the program sent was too big for its next hop
//! (fragmentation needed, the heart of path MTU discovery), or that the
//! peer cannot be reached, or that the packet's time ran out. The error
//! comes to lb's address, quoting the packet as the program sent it; lb's
//! stack has no socket for it any more. So the program turns it into the
//! error the sender of that packet would have got on a direct connection:
//! the quoted packet back into what the sender sent (its addresses, ports
//! and sequence number), the error sent to it from lb's address on its
//! side, with the ICMP checksum and both IPv4 header checksums updated.
//! The sender's stack then lowers its segments (or gives up) as it would.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect_neigh, programs::TcContext};
use lb_common::packet::{FlowKey, JOINED};

use super::{
    ETH_P_IP, IPPROTO_TCP, PASS, count,
    fields::{ETH_LEN, bytes, mapped, put, read, words},
};
use crate::maps::LB_FLOWS;

const IPPROTO_ICMP: u8 = 1;
/// An IPv4 header without options (version 4, 5 words).
const PLAIN_IPV4: u8 = 0x45;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Where the ICMP header is (after an outer IPv4 header without options),
/// the packet it quotes, and that packet's TCP header (its first 8 bytes
/// are all an error must quote: ports and sequence number).
const ICMP: usize = ETH_LEN + 20;
const QUOTED: usize = ICMP + 8;
const QUOTED_TCP: usize = QUOTED + 20;

/// Translates an ICMPv4 error about a joined connection and sends it on to
/// the peer; passes every other packet untouched.
#[inline(always)]
pub(super) fn icmp4(ctx: &TcContext) -> Result<i32, i32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(ETH_P_IP)
        || read::<u8>(ctx, ETH_LEN) != Some(PLAIN_IPV4)
        || read::<u8>(ctx, ETH_LEN + 9) != Some(IPPROTO_ICMP)
    {
        return Ok(PASS);
    }
    let kind: u8 = read(ctx, ICMP).ok_or(PASS)?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Ok(PASS);
    }
    if read::<u8>(ctx, QUOTED) != Some(PLAIN_IPV4) || read::<u8>(ctx, QUOTED + 9) != Some(IPPROTO_TCP) {
        return Ok(PASS);
    }
    let (qsrc, qdst): (u32, u32) = (read(ctx, QUOTED + 12).ok_or(PASS)?, read(ctx, QUOTED + 16).ok_or(PASS)?);
    let (qsport, qdport): (u16, u16) = (read(ctx, QUOTED_TCP).ok_or(PASS)?, read(ctx, QUOTED_TCP + 2).ok_or(PASS)?);
    let qseq: u32 = read(ctx, QUOTED_TCP + 4).ok_or(PASS)?;
    // The quoted packet is one the program sent on a joined connection: the
    // packets that come back on its addresses are the other direction's,
    // whose flow rewrites them into lb's address and the sender's.
    let back = FlowKey { src: bytes(mapped(qdst)), dst: bytes(mapped(qsrc)), sport: qdport, dport: qsport, _pad: 0 };
    let Some(r) = LB_FLOWS.get_ptr(&back) else { return Ok(PASS) };
    // SAFETY: map value pointer valid for the program's run; copied once.
    let r = unsafe { *r };
    if r.state != JOINED {
        return Ok(PASS);
    }
    // The direction the quoted packet went: it moved the sender's sequence
    // numbers by `seq_add`.
    let Some(f) = LB_FLOWS.get_ptr(&r.reverse_key()) else { return Ok(PASS) };
    // SAFETY: as above.
    let seq_add = unsafe { (*f).seq_add };
    let (sender, lb_side) = (words(&r.dst)[3], words(&r.src)[3]);
    let csum = ICMP + 2;
    // The quoted packet as its sender sent it. Its header checksum is part
    // of the ICMP message too: the ICMP checksum follows it.
    let old_qcsum: u16 = read(ctx, QUOTED + 10).ok_or(PASS)?;
    put(ctx, csum, QUOTED + 12, qsrc, sender, false)?;
    put(ctx, csum, QUOTED + 16, qdst, lb_side, false)?;
    for (from, to) in [(qsrc, sender), (qdst, lb_side)] {
        ctx.l3_csum_replace(QUOTED + 10, u64::from(from), u64::from(to), 4).map_err(|_| TC_ACT_SHOT)?;
    }
    let new_qcsum: u16 = read(ctx, QUOTED + 10).ok_or(TC_ACT_SHOT)?;
    ctx.l4_csum_replace(csum, u64::from(old_qcsum), u64::from(new_qcsum), 2).map_err(|_| TC_ACT_SHOT)?;
    put(ctx, csum, QUOTED_TCP, qsport, r.dport, false)?;
    put(ctx, csum, QUOTED_TCP + 2, qdport, r.sport, false)?;
    put(ctx, csum, QUOTED_TCP + 4, qseq, u32::from_be(qseq).wrapping_sub(seq_add).to_be(), false)?;
    // The error itself: from lb's address on the sender's side (the router
    // that sent it is not on the sender's path), to the sender.
    let (osrc, odst): (u32, u32) =
        (read(ctx, ETH_LEN + 12).ok_or(TC_ACT_SHOT)?, read(ctx, ETH_LEN + 16).ok_or(TC_ACT_SHOT)?);
    for (off, from, to) in [(ETH_LEN + 12, osrc, lb_side), (ETH_LEN + 16, odst, sender)] {
        ctx.store(off, &to, 0).map_err(|_| TC_ACT_SHOT)?;
        ctx.l3_csum_replace(ETH_LEN + 10, u64::from(from), u64::from(to), 4).map_err(|_| TC_ACT_SHOT)?;
    }
    count(|c| c.icmp += 1);
    if r.ifindex != 0 {
        // SAFETY: a helper on the context's packet; no parameters.
        return Ok(unsafe { bpf_redirect_neigh(r.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(PASS)
}
