//! The XDP guard: before the stack sees a packet, drop it if its source is
//! denied (and not allowed), or if it is a SYN to a frontend's port over its
//! source's rate. Everything else passes untouched, so established spliced
//! flows are never slowed.
//!
//! What it reads to get there:
//! - up to two VLAN tags (802.1Q, or 802.1ad around 802.1Q); a frame with a
//!   third is dropped (`unparsed`): the guard cannot see past it;
//! - the IPv4 header (options skipped) or the IPv6 header and up to
//!   [`MAX_EXT_HEADERS`] extension headers (hop-by-hop, routing, destination
//!   options, fragment) before TCP; a longer chain is dropped (`unparsed`)
//!   once the lists have been consulted;
//! - a fragment that is not the first holds no TCP header: it meets the
//!   lists, then passes (`fragments`), since the kernel reassembles nothing
//!   without the first fragment, whose SYN the guard checked. An IPv4 TCP
//!   fragment at offset 8 bytes, the only one that can rewrite the first
//!   fragment's flags (RFC 1858), is dropped (`unparsed`).
//!
//! A source is its IPv4 address, or its IPv6 /64 for the rate limit and the
//! top offenders: a host rotating addresses inside its /64 is one source.
//! The lists match the full address.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::guard::{GuardBucket, MAX_REFILL_NS, TOKEN};

use crate::maps::{
    LB_GUARD_ALLOW, LB_GUARD_CONF, LB_GUARD_DENY, LB_GUARD_PORTS, LB_GUARD_RATE, LB_GUARD_STATS, LB_GUARD_TOP,
};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_LEN: usize = 4;
const IPV6_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// IPv6 extension headers walked to find TCP (the verifier needs a bound).
const MAX_EXT_HEADERS: usize = 4;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// An address as the four words of its 16 bytes (IPv4 mapped), in memory
/// order. Words, not bytes: a byte array is filled or copied with a
/// `memset`/`memcpy` loop, and the verifier refuses the pointer arithmetic
/// of such a loop without `CAP_PERFMON` (lb as a service).
type Addr = [u32; 4];

#[xdp]
pub fn lb_guard(ctx: XdpContext) -> u32 {
    let v = classify(&ctx).unwrap_or(Verdict::Pass);
    // Every counter gets an addend: one field chosen per branch would be a
    // store at a computed offset into the map value, which the verifier
    // refuses without CAP_PERFMON.
    let (passed, fragments, denied, limited, unparsed) = match v {
        Verdict::Pass => (1, 0, 0, 0, 0),
        Verdict::Fragment => (1, 1, 0, 0, 0),
        Verdict::Deny => (0, 0, 1, 0, 0),
        Verdict::RateLimited => (0, 0, 0, 1, 0),
        Verdict::Unparsed => (0, 0, 0, 0, 1),
    };
    if let Some(c) = LB_GUARD_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe {
            (*c).passed += passed;
            (*c).fragments += fragments;
            (*c).denied += denied;
            (*c).rate_limited += limited;
            (*c).unparsed += unparsed;
        }
    }
    if passed == 1 { XDP_PASS } else { XDP_DROP }
}

/// What to do with a frame. No payload: a drop is counted against its
/// source where it is decided ([`dropped`]), since an enum carrying the
/// address compiles to reads of stack the other variants never wrote,
/// which the verifier refuses without `CAP_PERFMON`.
#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    /// A fragment that is not the first: passed.
    Fragment,
    Deny,
    RateLimited,
    /// Headers the guard does not read past: dropped.
    Unparsed,
}

/// `T` at the constant offset `OFF` in the frame, if the frame is that long.
#[inline(always)]
fn read<const OFF: usize, T: Copy>(ctx: &XdpContext) -> Option<T> {
    let start = ctx.data();
    if start + OFF + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + OFF) as *const T) })
}

/// `T` at `off` in the frame, if the frame is that long, copied by the
/// kernel. Past the Ethernet header offsets depend on the frame (VLAN
/// tags, IPv4 options, IPv6 extension headers), and without `CAP_PERFMON`
/// the verifier refuses any packet pointer moved by a register ("pointer
/// arithmetic with it prohibited for !root"). `T` is made of words, so
/// that no byte loop copies it.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let mut buf = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes `size_of::<T>()` bytes into `buf` or fails;
    // `buf` is read only when it did not.
    unsafe {
        let len = core::mem::size_of::<T>() as u32;
        if bpf_xdp_load_bytes(ctx.ctx, off as u32, buf.as_mut_ptr().cast(), len) != 0 {
            return None;
        }
        Some(buf.assume_init())
    }
}

/// What the IP layer says: the source, where TCP starts, whether this is a
/// fragment other than the first, and whether the guard can read on.
struct Ip {
    src: Addr,
    /// The source for the rate limit: the address, or its IPv6 /64.
    rate_key: Addr,
    /// The upper-layer protocol and its offset in the frame.
    proto: u8,
    l4: usize,
    later_fragment: bool,
    /// Headers the guard does not read past (too many IPv6 extension
    /// headers; an IPv4 TCP fragment at offset 8).
    unparsed: bool,
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Option<Verdict> {
    // Up to two VLAN tags, each branch at constant offsets.
    let mut ethertype = u16::from_be(read::<12, u16>(ctx)?);
    let mut l3 = ETH_LEN;
    if is_vlan(ethertype) {
        ethertype = u16::from_be(read::<{ 12 + VLAN_LEN }, u16>(ctx)?);
        l3 = ETH_LEN + VLAN_LEN;
        if is_vlan(ethertype) {
            ethertype = u16::from_be(read::<{ 12 + 2 * VLAN_LEN }, u16>(ctx)?);
            l3 = ETH_LEN + 2 * VLAN_LEN;
            if is_vlan(ethertype) {
                return Some(Verdict::Unparsed);
            }
        }
    }
    let ip = match ethertype {
        ETH_P_IP => ipv4(ctx, l3)?,
        ETH_P_IPV6 => ipv6(ctx, l3)?,
        _ => return Some(Verdict::Pass),
    };
    if listed(&ip.src, true) {
        return Some(Verdict::Pass);
    }
    if listed(&ip.src, false) {
        return Some(dropped(ip.rate_key, Verdict::Deny));
    }
    if ip.unparsed {
        return Some(dropped(ip.rate_key, Verdict::Unparsed));
    }
    if ip.later_fragment {
        return Some(Verdict::Fragment);
    }
    if ip.proto != IPPROTO_TCP {
        return Some(Verdict::Pass);
    }
    // The TCP header's first 16 bytes: ports, sequence, acknowledgement,
    // offset and flags.
    let th: [u32; 4] = load(ctx, ip.l4)?;
    let [_, _, port_hi, port_lo] = th[0].to_ne_bytes();
    if th[3].to_ne_bytes()[1] & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Some(Verdict::Pass);
    }
    let port = u16::from_be_bytes([port_hi, port_lo]);
    // SAFETY: only checks presence; the value is not read.
    if unsafe { LB_GUARD_PORTS.get(&port) }.is_none() {
        return Some(Verdict::Pass);
    }
    let conf = LB_GUARD_CONF.get(0)?;
    if conf.syn_rate == 0 || take_token(ip.rate_key, conf.syn_rate, conf.syn_burst) {
        Some(Verdict::Pass)
    } else {
        Some(dropped(ip.rate_key, Verdict::RateLimited))
    }
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Option<Ip> {
    // The fixed header, as words: [vihl, tos, len], [id, frag], [ttl,
    // proto, sum], source, destination.
    let h: [u32; 5] = load(ctx, l3)?;
    let [vihl, ..] = h[0].to_ne_bytes();
    let [_, _, frag_hi, frag_lo] = h[1].to_ne_bytes();
    let ihl = usize::from(vihl & 0x0f) * 4;
    let frag = u16::from_be_bytes([frag_hi, frag_lo]) & 0x1fff;
    let src = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), h[3]];
    // A header shorter than 20 bytes is no IPv4 the stack takes: it meets
    // the lists, then passes without a look at TCP.
    let proto = if ihl < 20 { 0 } else { h[2].to_ne_bytes()[1] };
    // A TCP fragment at offset 1 (8 bytes) can only rewrite the first
    // fragment's flags.
    let unparsed = proto == IPPROTO_TCP && frag == 1;
    Some(Ip { src, rate_key: src, proto, l4: l3 + ihl, later_fragment: frag != 0, unparsed })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Option<Ip> {
    // Next header and the source address: bytes 6 and 8..24 of the header.
    let h: [u32; 6] = load(ctx, l3)?;
    let src = [h[2], h[3], h[4], h[5]];
    let mut next = h[1].to_ne_bytes()[2];
    let mut off = l3 + IPV6_LEN;
    let mut later_fragment = false;
    let mut i = 0;
    while i < MAX_EXT_HEADERS && !later_fragment {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Next header, then the length in 8 bytes beyond the first 8.
                let [n, len, ..] = load::<u32>(ctx, off)?.to_ne_bytes();
                next = n;
                off += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                // Next header, reserved, then the offset (13 bits) and flags.
                let [n, _, off_hi, off_lo] = load::<u32>(ctx, off)?.to_ne_bytes();
                next = n;
                off += 8;
                later_fragment = u16::from_be_bytes([off_hi, off_lo]) & 0xfff8 != 0;
            }
            _ => break,
        }
        i += 1;
    }
    let unparsed = !later_fragment && matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT);
    Some(Ip { src, rate_key: [src[0], src[1], 0, 0], proto: next, l4: off, later_fragment, unparsed })
}

/// Whether `src` matches an entry of the allow list (`allow`) or the deny list.
#[inline(always)]
fn listed(src: &Addr, allow: bool) -> bool {
    let mut k = MaybeUninit::<[u32; 5]>::uninit();
    let p = k.as_mut_ptr().cast::<u32>();
    // SAFETY: five words inside `k`, written before the read; `Key` is the
    // prefix length (u32, host order) then the 16 bytes, packed.
    let key = unsafe {
        core::ptr::write_volatile(p, 128);
        core::ptr::write_volatile(p.add(1), src[0]);
        core::ptr::write_volatile(p.add(2), src[1]);
        core::ptr::write_volatile(p.add(3), src[2]);
        core::ptr::write_volatile(p.add(4), src[3]);
        &*p.cast::<Key<[u8; 16]>>()
    };
    if allow { LB_GUARD_ALLOW.get(key).is_some() } else { LB_GUARD_DENY.get(key).is_some() }
}

/// Runs `f` on `a` as the 16-byte key of a hash map, written word by word
/// into uninitialised stack (a key built as a value is zeroed by a loop first).
#[inline(always)]
fn with_key<R>(a: Addr, f: impl FnOnce(&[u8; 16]) -> R) -> R {
    let mut k = MaybeUninit::<Addr>::uninit();
    let p = k.as_mut_ptr().cast::<u32>();
    // SAFETY: four words inside `k`, written before the read.
    let key = unsafe {
        core::ptr::write_volatile(p, a[0]);
        core::ptr::write_volatile(p.add(1), a[1]);
        core::ptr::write_volatile(p.add(2), a[2]);
        core::ptr::write_volatile(p.add(3), a[3]);
        &*p.cast::<[u8; 16]>()
    };
    f(key)
}

/// Takes one token from `src`'s bucket (refilled at `rate` per second up to
/// `burst`); false when there is none.
#[inline(always)]
fn take_token(src: Addr, rate: u64, burst: u64) -> bool {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = burst * TOKEN;
    with_key(src, |key| match LB_GUARD_RATE.get_ptr_mut(key) {
        Some(b) => {
            // SAFETY: map value pointer valid for the program's run; a race
            // between CPUs costs at most a token.
            let b = unsafe { &mut *b };
            let mut elapsed = now.saturating_sub(b.last_ns);
            if elapsed > MAX_REFILL_NS {
                elapsed = MAX_REFILL_NS;
            }
            let mut tokens = b.tokens + elapsed * rate / 1000;
            if tokens > cap {
                tokens = cap;
            }
            b.last_ns = now;
            if tokens >= TOKEN {
                b.tokens = tokens - TOKEN;
                true
            } else {
                b.tokens = tokens;
                false
            }
        }
        None => {
            let fresh = GuardBucket { tokens: cap.saturating_sub(TOKEN), last_ns: now };
            let _ = LB_GUARD_RATE.insert(key, fresh, 0);
            cap >= TOKEN
        }
    })
}

/// Counts a dropped packet against its source (the rate key); returns `v`.
#[inline(always)]
fn dropped(src: Addr, v: Verdict) -> Verdict {
    with_key(src, |key| match LB_GUARD_TOP.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for the program's run.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = LB_GUARD_TOP.insert(key, 1u64, 0);
        }
    });
    v
}
