//! sock_ops: the kernel splices sockets at `ESTABLISHED`, so userspace makes
//! one insert per connection instead of four.
//!
//! - A client accepted on a frontend (`LB_FRONTENDS`: address and namespace)
//!   becomes a redirect target (`LB_TARGET`) at once. Its own bytes are not
//!   diverted: lb still reads what it reads of them and splices it later.
//! - A server socket whose record the worker wrote before `connect()`
//!   (`LB_CONN`, `setup == SETUP_PENDING`) becomes a target and is spliced
//!   (`LB_SPLICE`) when the handshake completes, before any byte of the
//!   server can arrive; it gets `TCP_NODELAY`, and its source address and
//!   port go into both records (the worker reads them there instead of
//!   asking the socket).
//!   Its bytes are redirected to the client's target from then on.
//!
//! What cannot be done is left to userspace, which learns it from the
//! server's record (`SETUP_FAILED`, or still `SETUP_PENDING` when no program
//! ran) and inserts the entries itself as before. In particular a server is
//! spliced only if this program made its client a target (`LB_TARGET_OK`):
//! a client that could not become one at its accept (the map full, no
//! memory for its psock) gets its server's bytes only once the worker has
//! made it one.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_ops},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_load_hdr_opt, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use lb_common::{
    conn::{FrontendKey, SETUP_FAILED, SETUP_KERNEL, SETUP_PENDING, SIDE_SERVER},
    packet::Handshake,
    stats::COUNTERS_KEY,
};

use crate::maps::{LB_CONN, LB_COUNTERS, LB_FRONTENDS, LB_HANDSHAKE, LB_SPLICE, LB_TARGET, LB_TARGET_OK};

const AF_INET: u32 = 2;
const SOL_TCP: i32 = 6;
const TCP_NODELAY: i32 = 1;
/// TCP option kinds: timestamps, MSS.
const OPT_TS: u32 = 8;
const OPT_MSS: u32 = 2;
/// `BPF_LOAD_HDR_OPT_TCP_SYN`: search the saved SYN, not the packet at hand.
const LOAD_FROM_SYN: u64 = 1;

#[sock_ops]
pub fn lb_setup(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => accepted(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => connected(&ctx),
        _ => {}
    }
    1
}

fn ops(ctx: &SockOpsContext) -> &mut bpf_sock_ops {
    // SAFETY: the context the kernel passed, valid for the program's run.
    unsafe { &mut *ctx.ops }
}

fn count(kernel: bool) {
    let Some(c) = LB_COUNTERS.get_ptr_mut(COUNTERS_KEY) else { return };
    // Both counters, no branch (see the verdict).
    // SAFETY: per-CPU slot, valid for the program's run.
    unsafe {
        (*c).kernel_setups += u64::from(kernel);
        (*c).kernel_setup_failures += u64::from(!kernel);
    }
}

/// The socket's local address as the four words of its 16 bytes (IPv4
/// mapped), in memory order. Words, not bytes: filling a byte array takes
/// a `memset`/`memcpy` loop, and the verifier refuses the pointer
/// arithmetic of such a loop without `CAP_PERFMON` (lb as a service has
/// only `CAP_BPF` and `CAP_NET_ADMIN`).
#[inline(always)]
fn local_ip(ctx: &SockOpsContext) -> [u32; 4] {
    // Every context field read once, at its constant offset, before any
    // branch: the verifier refuses a context access at an offset that
    // depends on the path (LLVM merges the two branches' loads otherwise).
    // SAFETY: the context the kernel passed, valid for the program's run.
    let (family, ip4, ip6) = unsafe {
        let o = ctx.ops;
        (
            core::ptr::read_volatile(&raw const (*o).family),
            core::ptr::read_volatile(&raw const (*o).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*o).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*o).local_ip6[3]),
            ],
        )
    };
    if family == AF_INET { [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4] } else { ip6 }
}

/// Writes an address of [`local_ip`] into a record's 16-byte field.
///
/// # Safety
/// `dst` points into a map value, valid for the program's run.
unsafe fn put_ip(dst: *mut [u8; 16], w: [u32; 4]) {
    // The field is at a multiple of 8 in `ConnTraffic` (a map value is
    // 8-aligned), so word writes are aligned.
    let p = dst.cast::<u32>();
    // SAFETY: four words inside the field (see above).
    unsafe {
        core::ptr::write_volatile(p, w[0]);
        core::ptr::write_volatile(p.add(1), w[1]);
        core::ptr::write_volatile(p.add(2), w[2]);
        core::ptr::write_volatile(p.add(3), w[3]);
    }
}

/// The namespace cookie `LB_FRONTENDS` has for the address `ip`, `port`.
/// The key is written word by word into uninitialised stack: a key built
/// as a value, zeros included, is zeroed with a `memset` loop first.
#[inline(always)]
pub(crate) fn frontend_ns(ip: [u32; 4], port: u16) -> Option<u64> {
    let mut k = core::mem::MaybeUninit::<[u32; 5]>::uninit();
    let p = k.as_mut_ptr().cast::<u32>();
    // SAFETY: five words inside `k`. `FrontendKey` is 20 bytes, `repr(C)`,
    // 2-aligned: the same bytes (the port first in the last word, little
    // endian, its padding zero).
    let key = unsafe {
        core::ptr::write_volatile(p, ip[0]);
        core::ptr::write_volatile(p.add(1), ip[1]);
        core::ptr::write_volatile(p.add(2), ip[2]);
        core::ptr::write_volatile(p.add(3), ip[3]);
        core::ptr::write_volatile(p.add(4), u32::from(port));
        &*p.cast::<FrontendKey>()
    };
    // SAFETY: read at once, no reference kept.
    unsafe { LB_FRONTENDS.get(key) }.copied()
}

/// Records where the socket's and its peer's sequence spaces start, the
/// peer's TSval in the packet that completed the handshake (the client's
/// last ACK, the server's SYN-ACK) with the time it was read, and the MSS, under the socket's cookie:
/// what the packet plane's join needs to map one connection onto another.
/// At `ESTABLISHED` nothing but the SYNs has been sent either way yet.
#[inline(always)]
fn record_handshake(ctx: &SockOpsContext, cookie: u64, syn: u64) {
    // The search: kind 8 (timestamps), length 0 (any); the helper copies
    // the option over it. Words: a byte array is zeroed by a loop the
    // verifier refuses without CAP_PERFMON.
    let mut opt: [u32; 3] = [OPT_TS, 0, 0];
    // SAFETY: `opt` is 12 bytes on the stack, its length given.
    let n = unsafe { bpf_load_hdr_opt(ctx.ops.cast(), (&raw mut opt).cast(), 12, 0) };
    // Bytes 2..6 of the option, network order.
    let b = |w: u32, i: u32| (w >> (8 * i)) & 0xff;
    let tsval =
        if n == 10 { (b(opt[0], 2) << 24) | (b(opt[0], 3) << 16) | (b(opt[1], 0) << 8) | b(opt[1], 1) } else { 0 };
    // SAFETY: a helper without arguments.
    let at_ms = (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32;
    // The MSS the peer announced: in the server's SYN-ACK (the packet at
    // hand when a connect completes), in the client's SYN (kept by the
    // listener, `TCP_SAVE_SYN`) when an accept does. Kind 2, length 4.
    let mut m: [u32; 2] = [OPT_MSS, 0];
    // SAFETY: `m` is 8 bytes on the stack, its length given.
    let n = unsafe { bpf_load_hdr_opt(ctx.ops.cast(), (&raw mut m).cast(), 8, syn) };
    let mss = if n == 4 { (b(m[0], 2) << 8) | b(m[0], 3) } else { 0 };
    // SAFETY: the context the kernel passed; fields read at their offsets.
    let (snd, rcv) = unsafe {
        let o = ctx.ops;
        (core::ptr::read_volatile(&raw const (*o).snd_nxt), core::ptr::read_volatile(&raw const (*o).rcv_nxt))
    };
    let h = Handshake { snd_base: snd, rcv_base: rcv, peer_tsval: tsval, mss, at_ms };
    let _ = LB_HANDSHAKE.insert(cookie, h, u64::from(BPF_ANY));
}

fn accepted(ctx: &SockOpsContext) {
    let port = ctx.local_port() as u16;
    let Some(ns) = frontend_ns(local_ip(ctx), port).or_else(|| frontend_ns([0, 0, 0, 0], port)) else { return };
    // SAFETY: the helpers read the context's socket.
    if ns != unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } {
        return;
    }
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    record_handshake(ctx, cookie, LOAD_FROM_SYN);
    if LB_TARGET.update(&mut cookie, ops(ctx), u64::from(BPF_ANY)).is_ok() {
        // What its server's splice asks (`connected`). Not recorded (no
        // room: an LRU evicts instead, and an entry may age out) means not
        // a target there: safe, only slower.
        let _ = LB_TARGET_OK.insert(cookie, 1, u64::from(BPF_ANY));
    } else {
        count(false);
    }
}

fn connected(ctx: &SockOpsContext) {
    // SAFETY: the helper reads the context's socket.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(rec) = LB_CONN.get_ptr_mut(cookie) else { return };
    // SAFETY: map value pointer valid for the program's run; the worker
    // does not touch the record until its connect() has returned.
    let (side, setup, peer) = unsafe { ((*rec).side, (*rec).setup, (*rec).peer_cookie) };
    if side != SIDE_SERVER || setup != SETUP_PENDING {
        return;
    }
    record_handshake(ctx, cookie, 0);
    let ip = local_ip(ctx);
    let port = ctx.local_port() as u16;
    // SAFETY: as above.
    unsafe {
        put_ip(&raw mut (*rec).source_ip, ip);
        (*rec).source_port = port;
    }
    if let Some(c) = LB_CONN.get_ptr_mut(peer) {
        // SAFETY: as above.
        unsafe {
            put_ip(&raw mut (*c).source_ip, ip);
            (*c).source_port = port;
        }
    }
    // The server is spliced toward its client's target: a client that is
    // none (the map was full or out of memory at its accept) would get
    // nothing, and the server's bytes would wait on the server's socket
    // until the idle timeout. Unless this program made the client a target
    // (and the record of it is still there), leave the connection to
    // userspace, which makes the client a target before it splices
    // anything. (No client is accepted before the program is attached: lb
    // attaches it before it listens.)
    let client_missed = LB_TARGET_OK.get_ptr(peer).is_none();
    let _ = LB_TARGET_OK.remove(peer);
    // TCP_NODELAY, which the worker would set otherwise (one syscall).
    let mut one: i32 = 1;
    // SAFETY: `one` is an int on the stack, its length given.
    let nodelay = unsafe { bpf_setsockopt(ctx.ops.cast(), SOL_TCP, TCP_NODELAY, (&raw mut one).cast(), 4) };
    let ok = !client_missed
        && nodelay == 0
        && LB_TARGET.update(&mut cookie, ops(ctx), u64::from(BPF_ANY)).is_ok()
        && LB_SPLICE.update(&mut cookie, ops(ctx), u64::from(BPF_ANY)).is_ok();
    // SAFETY: as above.
    unsafe { (*rec).setup = if ok { SETUP_KERNEL } else { SETUP_FAILED } };
    count(ok);
}
