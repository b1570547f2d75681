//! The XDP guard: before the stack sees a packet, drop it if its source is
//! denied (and not allowed), or if it is a SYN to a frontend's port over its
//! source's rate. Everything else passes untouched, so established spliced
//! flows are never slowed.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::lpm_trie::Key,
    helpers::bpf_ktime_get_ns,
    macros::xdp,
    programs::XdpContext,
};
use lb_common::guard::{GuardBucket, GuardCounters, MAX_REFILL_NS, TOKEN};

use crate::maps::{
    LB_GUARD_ALLOW, LB_GUARD_CONF, LB_GUARD_DENY, LB_GUARD_PORTS, LB_GUARD_RATE, LB_GUARD_STATS, LB_GUARD_TOP,
};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn lb_guard(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Some(Verdict::Deny(src)) => {
            count(|c| c.denied += 1);
            offender(&src);
            XDP_DROP
        }
        Some(Verdict::RateLimited(src)) => {
            count(|c| c.rate_limited += 1);
            offender(&src);
            XDP_DROP
        }
        Some(Verdict::Pass) | None => {
            count(|c| c.passed += 1);
            XDP_PASS
        }
    }
}

enum Verdict {
    Pass,
    Deny([u8; 16]),
    RateLimited([u8; 16]),
}

/// `T` at `off` in the packet, if the packet is that long.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Option<Verdict> {
    let proto = u16::from_be(read::<u16>(ctx, 12)?);
    let (src, l4, ip_proto, first_fragment) = match proto {
        ETH_P_IP => {
            let vihl: u8 = read(ctx, ETH_LEN)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < 20 {
                return Some(Verdict::Pass);
            }
            let frag = u16::from_be(read::<u16>(ctx, ETH_LEN + 6)?);
            let v4: [u8; 4] = read(ctx, ETH_LEN + 12)?;
            let mut src = [0u8; 16];
            src[10] = 0xff;
            src[11] = 0xff;
            src[12] = v4[0];
            src[13] = v4[1];
            src[14] = v4[2];
            src[15] = v4[3];
            (src, ETH_LEN + ihl, read::<u8>(ctx, ETH_LEN + 9)?, frag & 0x1fff == 0)
        }
        ETH_P_IPV6 => (read::<[u8; 16]>(ctx, ETH_LEN + 8)?, ETH_LEN + 40, read::<u8>(ctx, ETH_LEN + 6)?, true),
        _ => return Some(Verdict::Pass),
    };
    let key = Key::new(128, src);
    if LB_GUARD_ALLOW.get(&key).is_some() {
        return Some(Verdict::Pass);
    }
    if LB_GUARD_DENY.get(&key).is_some() {
        return Some(Verdict::Deny(src));
    }
    if ip_proto != IPPROTO_TCP || !first_fragment {
        return Some(Verdict::Pass);
    }
    // The TCP header up to its flags, in one read: one bounds check the
    // verifier can follow (two reads from one variable offset compile to a
    // pointer it cannot prove in bounds).
    let th: [u8; 14] = read(ctx, l4)?;
    if th[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Some(Verdict::Pass);
    }
    let port = u16::from_be_bytes([th[2], th[3]]);
    // SAFETY: only checks presence; the value is not read.
    if unsafe { LB_GUARD_PORTS.get(&port) }.is_none() {
        return Some(Verdict::Pass);
    }
    let conf = LB_GUARD_CONF.get(0)?;
    if conf.syn_rate == 0 || take_token(&src, conf.syn_rate, conf.syn_burst) {
        Some(Verdict::Pass)
    } else {
        Some(Verdict::RateLimited(src))
    }
}

/// Takes one token from `src`'s bucket (refilled at `rate` per second up to
/// `burst`); false when there is none.
#[inline(always)]
fn take_token(src: &[u8; 16], rate: u64, burst: u64) -> bool {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = burst * TOKEN;
    match LB_GUARD_RATE.get_ptr_mut(src) {
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
            let _ = LB_GUARD_RATE.insert(src, fresh, 0);
            cap >= TOKEN
        }
    }
}

#[inline(always)]
fn count(f: impl FnOnce(&mut GuardCounters)) {
    if let Some(c) = LB_GUARD_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, valid for the program's run.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn offender(src: &[u8; 16]) {
    match LB_GUARD_TOP.get_ptr_mut(src) {
        // SAFETY: map value pointer valid for the program's run.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = LB_GUARD_TOP.insert(src, 1u64, 0);
        }
    }
}
