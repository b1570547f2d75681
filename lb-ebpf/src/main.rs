//! lb's eBPF object: maps, the sk_skb verdict that splices sockets, the
//! sock_ops program that splices them at `ESTABLISHED`, the TC program of
//! the packet plane, and the XDP guard at the edge.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_skb;
#[cfg(target_arch = "bpf")]
mod sock_ops;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: sockmap redirect helpers are GPL-only on some kernels.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds (clippy, `cargo check --workspace`) see an empty program.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
