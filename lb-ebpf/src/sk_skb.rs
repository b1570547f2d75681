//! sk_skb stream verdict: redirect every skb a spliced socket receives to the
//! egress of its peer, found in `LB_TARGET` under the peer's cookie, which
//! the receiving socket's record (`LB_CONN`) holds.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    macros::stream_verdict,
    programs::SkBuffContext,
};
use lb_common::{
    conn::{FlowEvent, SIDE_CLIENT},
    stats::COUNTERS_KEY,
};

use crate::maps::{LB_CONN, LB_COUNTERS, LB_EVENTS, LB_TARGET};

#[stream_verdict]
pub fn lb_verdict(ctx: SkBuffContext) -> u32 {
    match try_lb_verdict(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_lb_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    // SAFETY: the helper only reads skb->sk.
    let cookie: u64 = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN. TCP has already recorded it (userspace sees EPOLLRDHUP);
        // redirected, the empty skb would make the peer's send path fail with
        // EPIPE and stop its transmit side. Nothing to deliver, so drop it.
        return Err(SK_DROP);
    }
    let counters = LB_COUNTERS.get_ptr_mut(COUNTERS_KEY).ok_or(SK_PASS)?;
    // Every spliced socket has its record (written before it is spliced,
    // removed after it is closed).
    let Some(t) = LB_CONN.get_ptr_mut(&cookie) else {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { (*counters).peer_missing += 1 };
        return Err(SK_PASS);
    };
    // SAFETY: map value pointer valid for the program's run.
    let peer = unsafe { (*t).peer_cookie };
    // Flags 0: redirect to the peer's egress (its send path), not its ingress.
    let verdict = LB_TARGET.redirect_skb(ctx, peer, 0) as u32;
    if verdict != SK_PASS {
        // No peer (the connection is being torn down): keep the bytes on the
        // receiving socket instead of dropping them.
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { (*counters).peer_missing += 1 };
        return Err(SK_PASS);
    }
    // SAFETY: per-CPU slot, valid for the program's run.
    unsafe {
        (*counters).skbs_redirected += 1;
        (*counters).bytes_redirected += len;
    }
    // SAFETY: map value pointer valid for the program's run. Plain adds
    // are enough: the entry belongs to the receiving socket only, and the
    // kernel runs that socket's verdict under its socket lock.
    let (before, rec) = unsafe {
        let before = (*t).bytes;
        (*t).bytes = before + len;
        (*t).skbs += 1;
        (*t).last_active_ns = bpf_ktime_get_coarse_ns();
        (before, &*t)
    };
    let shift = u64::from(rec.event_shift) & 63;
    if shift != 0 && before >> shift != (before + len) >> shift {
        // Another `1 << shift` bytes went to the peer: its holder looks at
        // how many of them still wait in front of it.
        let id = if rec.side == SIDE_CLIENT { cookie } else { rec.peer_cookie };
        let ev = FlowEvent { id, bytes: before + len, side: u64::from(rec.side) };
        let sent = LB_EVENTS.get(u32::from(rec.worker)).is_some_and(|ring| ring.output(&ev, 0).is_ok());
        // Both counters, no branch: a branch lets LLVM pick the field's
        // offset by path, and the verifier refuses such pointer arithmetic
        // without CAP_PERFMON.
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe {
            (*counters).flow_events += u64::from(sent);
            (*counters).flow_events_lost += u64::from(!sent);
        }
    }
    Ok(verdict)
}
