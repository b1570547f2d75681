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
//! ran) and inserts the entries itself as before.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_ops},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use lb_common::{
    conn::{FrontendKey, SETUP_FAILED, SETUP_KERNEL, SETUP_PENDING, SIDE_SERVER},
    stats::COUNTERS_KEY,
};

use crate::maps::{LB_CONN, LB_COUNTERS, LB_FRONTENDS, LB_SETUP_MISS, LB_SPLICE, LB_TARGET};

const AF_INET: u32 = 2;
const SOL_TCP: i32 = 6;
const TCP_NODELAY: i32 = 1;

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

/// The socket's local address as 16 bytes (IPv4 mapped), network order.
fn local_ip(ctx: &SockOpsContext) -> [u8; 16] {
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
    let mut ip = [0u8; 16];
    if family == AF_INET {
        ip[10] = 0xff;
        ip[11] = 0xff;
        ip[12..].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        ip[..4].copy_from_slice(&ip6[0].to_ne_bytes());
        ip[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
        ip[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
        ip[12..].copy_from_slice(&ip6[3].to_ne_bytes());
    }
    ip
}

fn accepted(ctx: &SockOpsContext) {
    let port = ctx.local_port() as u16;
    let key = FrontendKey { ip: local_ip(ctx), port, _pad: 0 };
    let any = FrontendKey { ip: [0; 16], port, _pad: 0 };
    // SAFETY: read at once, no reference kept.
    let Some(ns) = (unsafe { LB_FRONTENDS.get(key).or_else(|| LB_FRONTENDS.get(any)) }).copied() else { return };
    // SAFETY: the helpers read the context's socket.
    if ns != unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } {
        return;
    }
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if LB_TARGET.update(&mut cookie, ops(ctx), u64::from(BPF_ANY)).is_err() {
        let _ = LB_SETUP_MISS.insert(cookie, 1, u64::from(BPF_ANY));
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
    let ip = local_ip(ctx);
    let port = ctx.local_port() as u16;
    // SAFETY: as above.
    unsafe {
        (*rec).source_ip = ip;
        (*rec).source_port = port;
    }
    if let Some(c) = LB_CONN.get_ptr_mut(peer) {
        // SAFETY: as above.
        unsafe {
            (*c).source_ip = ip;
            (*c).source_port = port;
        }
    }
    // A client that is not a target (no memory at accept) must not get
    // server bytes passed ahead of the ones userspace redirects once it
    // has made it one: leave it all to userspace. (No client is accepted
    // before the program is attached: lb attaches it before it listens.)
    let client_missed = LB_SETUP_MISS.get_ptr(peer).is_some();
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
