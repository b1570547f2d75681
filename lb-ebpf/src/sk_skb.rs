//! sk_skb stream verdict: redirect every skb a spliced socket receives to the
//! egress of its peer, found in `LB_TARGET` under the peer's cookie, which
//! the receiving socket's record (`LB_CONN`) holds.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    macros::stream_verdict,
    programs::SkBuffContext,
};
use lb_common::{
    conn::{ConnTraffic, FlowEvent, SIDE_CLIENT},
    stats::{COUNTERS_KEY, ServerBytes, ServerBytesKey},
};

use crate::maps::{LB_CONN, LB_COUNTERS, LB_EVENTS, LB_SERVER_BYTES, LB_TARGET};

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
    count_server_bytes(t, len);
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

/// Adds `len` bytes the socket of record `rec` received to its server's
/// counters (`bytes_in` for the client's socket, `bytes_out` for the
/// server's), making the server's entry at its first byte.
#[inline(always)]
fn count_server_bytes(rec: *const ConnTraffic, len: u64) {
    // The key is written word by word into uninitialised stack (a key built
    // as a value is zeroed with a byte loop first, which the verifier
    // refuses without CAP_PERFMON): the server's 16 address bytes, then its
    // port and backend (both u16, little endian, in one word).
    let mut k = core::mem::MaybeUninit::<[u32; 5]>::uninit();
    let p = k.as_mut_ptr().cast::<u32>();
    // SAFETY: `rec` points to a map value, valid for the program's run, and
    // its address field is 8-aligned (a multiple of 8 into the value);
    // five words inside `k`; `ServerBytesKey` is 20 bytes, `repr(C)`,
    // 2-aligned, in this order.
    let (key, side) = unsafe {
        let ip = (&raw const (*rec).server_ip).cast::<u32>();
        core::ptr::write_volatile(p, core::ptr::read_volatile(ip));
        core::ptr::write_volatile(p.add(1), core::ptr::read_volatile(ip.add(1)));
        core::ptr::write_volatile(p.add(2), core::ptr::read_volatile(ip.add(2)));
        core::ptr::write_volatile(p.add(3), core::ptr::read_volatile(ip.add(3)));
        let port = u32::from(core::ptr::read_volatile(&raw const (*rec).server_port));
        let backend = u32::from(core::ptr::read_volatile(&raw const (*rec).backend));
        core::ptr::write_volatile(p.add(4), port | backend << 16);
        (&*p.cast::<ServerBytesKey>(), u64::from((*rec).side) & 1)
    };
    let b = match LB_SERVER_BYTES.get_ptr_mut(key) {
        Some(b) => b,
        None => {
            // Zeros written word by word, as the key (a `default()` value is
            // zeroed with a byte loop).
            let mut z = core::mem::MaybeUninit::<[u64; 2]>::uninit();
            let zp = z.as_mut_ptr().cast::<u64>();
            // SAFETY: two words inside `z`; `ServerBytes` is two u64s.
            let zero = unsafe {
                core::ptr::write_volatile(zp, 0);
                core::ptr::write_volatile(zp.add(1), 0);
                &*zp.cast::<ServerBytes>()
            };
            // Another CPU may make it first: then this insert fails and the
            // lookup finds that one.
            let _ = LB_SERVER_BYTES.insert(key, zero, u64::from(BPF_NOEXIST));
            let Some(b) = LB_SERVER_BYTES.get_ptr_mut(key) else { return };
            b
        }
    };
    // Both fields, no branch (see the flow-event counters).
    // SAFETY: this CPU's slot of the entry, valid for the program's run.
    unsafe {
        (*b).bytes_in += len * (1 - side);
        (*b).bytes_out += len * side;
    }
}
