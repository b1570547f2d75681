//! The packet's fields: reading them where the verifier can check the
//! reads, finding the TCP options, and rewriting a packet in place into
//! the other connection with incremental checksum updates.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_skb_load_bytes, programs::TcContext};
use lb_common::{packet::Flow, stats::COUNTERS_KEY};

use crate::maps::LB_PKT_SCRATCH;

pub(super) const ETH_LEN: usize = 14;
pub(super) const FIN: u8 = 0x01;
pub(super) const SYN: u8 = 0x02;
pub(super) const RST: u8 = 0x04;
pub(super) const ACK: u8 = 0x10;
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

/// `T` at `off` in the packet, if the packet is that long. Copied by
/// `bpf_skb_load_bytes`, not read through a packet pointer: most offsets
/// here depend on the packet (the IPv4 header's length, the TCP options),
/// and without `CAP_PERFMON` (lb's service has only `CAP_BPF` and
/// `CAP_NET_ADMIN`) the verifier refuses a packet pointer moved by a
/// variable (`retrieve_ptr_limit`: the Spectre v1 sanitation knows limits
/// only for stack and map value pointers).
#[inline(always)]
pub(super) fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // Zeroed first: no path of the compiled program may read a register
    // the verifier has not seen written, as one built from an
    // uninitialised value (`MaybeUninit`) can.
    // SAFETY: every `T` read here is an integer or an array of them, for
    // which zero bytes are a value.
    let mut v = unsafe { core::mem::zeroed::<T>() };
    // SAFETY: the context's socket buffer, and `v`'s own bytes as the
    // destination, their length given.
    let ret = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb.cast(), off as u32, (&raw mut v).cast(), core::mem::size_of::<T>() as u32)
    };
    (ret == 0).then_some(v)
}

/// An IPv4 address (as it sits in the packet) as the words of
/// `::ffff:a.b.c.d`.
#[inline(always)]
pub(super) fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// An address's words as its 16 bytes. Built as words: a byte array is
/// filled by a loop the verifier refuses without `CAP_PERFMON`.
#[inline(always)]
pub(super) fn bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size, and any bytes are valid u8s.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// An address's 16 bytes as words, as they sit in a packet.
#[inline(always)]
pub(super) fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: as `bytes`, the other way.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*a) }
}

/// A packet's IP addresses: where they are and what they hold.
pub(super) struct Addrs {
    /// IPv6 (else IPv4).
    pub(super) v6: bool,
    /// As words of 16 bytes (IPv4 mapped).
    pub(super) src: [u32; 4],
    pub(super) dst: [u32; 4],
}

/// Writes the address `to` over `from` at `off` (IPv6: 16 bytes), with
/// the TCP checksum's pseudo header.
#[inline(always)]
fn put_addr6(ctx: &TcContext, csum: usize, off: usize, from: [u32; 4], to: [u32; 4]) -> Result<(), i32> {
    ctx.store(off, &to, 0).map_err(|_| TC_ACT_SHOT)?;
    for i in 0..4 {
        ctx.l4_csum_replace(csum, u64::from(from[i]), u64::from(to[i]), 4 | PSEUDO).map_err(|_| TC_ACT_SHOT)?;
    }
    Ok(())
}

/// Writes the IPv4 address `to` over `from` at `off`, with the IP header's
/// checksum and the TCP checksum's pseudo header.
#[inline(always)]
fn put_addr4(ctx: &TcContext, csum: usize, off: usize, from: u32, to: u32) -> Result<(), i32> {
    ctx.store(off, &to, 0).map_err(|_| TC_ACT_SHOT)?;
    ctx.l3_csum_replace(ETH_LEN + 10, u64::from(from), u64::from(to), 4).map_err(|_| TC_ACT_SHOT)?;
    ctx.l4_csum_replace(csum, u64::from(from), u64::from(to), 4 | PSEUDO).map_err(|_| TC_ACT_SHOT)
}

/// Where a packet's TCP header and options are.
pub(super) struct Tcp {
    /// Offset of the TCP header.
    pub(super) at: usize,
    pub(super) flags: u8,
    pub(super) payload: u64,
    /// Offset of the timestamp option's TSval (0: none).
    pub(super) ts: usize,
    /// Offset of the first SACK block (0: none), and how many.
    pub(super) sack: usize,
    pub(super) sack_n: u32,
}

/// Finds the timestamp and SACK options (read only; nothing is changed).
#[inline(always)]
pub(super) fn options(ctx: &TcContext, t: usize, hlen: usize) -> (usize, usize, u32) {
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
pub(super) fn launder((ts, sack, sack_n): (usize, usize, u32)) -> (usize, usize, u32) {
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

/// Writes `to` over the `N`-byte field at `off` that holds `from`, and
/// updates the TCP checksum (`pseudo`: the field is in its pseudo header).
#[inline(always)]
pub(super) fn put<T: Copy + Into<u32>>(
    ctx: &TcContext,
    csum: usize,
    off: usize,
    from: T,
    to: T,
    pseudo: bool,
) -> Result<(), i32> {
    let size = core::mem::size_of::<T>() as u64;
    ctx.store(off, &to, 0).map_err(|_| TC_ACT_SHOT)?;
    let flags = size | if pseudo { PSEUDO } else { 0 };
    ctx.l4_csum_replace(csum, u64::from(from.into()), u64::from(to.into()), flags).map_err(|_| TC_ACT_SHOT)
}

/// Moves the 32-bit field at `off` (network order) by `add`.
#[inline(always)]
pub(super) fn shift_field(ctx: &TcContext, csum: usize, off: usize, add: u32) -> Result<(), i32> {
    let old: u32 = read(ctx, off).ok_or(TC_ACT_SHOT)?;
    let new = u32::from_be(old).wrapping_add(add).to_be();
    put(ctx, csum, off, old, new, false)
}

/// Rewrites the packet in place into the other connection. A packet the
/// program cannot finish rewriting is dropped (its sender sends it again),
/// never delivered half rewritten.
#[inline(always)]
pub(super) fn rewrite(ctx: &TcContext, f: &Flow, tcp: &Tcp, a: &Addrs, sport: u16, dport: u16) -> Result<(), i32> {
    let t = tcp.at;
    let csum = t + 16;
    let (nsrc, ndst) = (words(&f.src), words(&f.dst));
    if a.v6 {
        put_addr6(ctx, csum, ETH_LEN + 8, a.src, nsrc)?;
        put_addr6(ctx, csum, ETH_LEN + 24, a.dst, ndst)?;
    } else {
        put_addr4(ctx, csum, ETH_LEN + 12, a.src[3], nsrc[3])?;
        put_addr4(ctx, csum, ETH_LEN + 16, a.dst[3], ndst[3])?;
    }
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
