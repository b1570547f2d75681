//! `lb`: a TCP load balancer for very many long-lived connections. Bytes are
//! spliced between client and server sockets inside the kernel (eBPF sockmap),
//! or copied in userspace where the kernel path is not available.
//!
//! Modules, from the bottom up (each uses only those above it in this list):
//! `addr`, `proxy_protocol` (the PROXY header's wire format), `sni` (the
//! server name of a TLS ClientHello), `kernel`
//! (eBPF object, maps, raw socket options), `config`,
//! `servers`, `observe`, `dataplane`, `proxy`, `control`, `instance`, `cli`.
//! See ARCHITECTURE.md.

pub mod addr;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod instance;
pub mod kernel;
pub mod observe;
pub mod proxy;
pub mod proxy_protocol;
pub mod servers;
pub mod sni;

/// The eBPF object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// SHA-256 (hex) of [`EBPF_OBJECT`]: recorded with the pins of the instance
/// whose programs it is, shown by `lb stats` and `lb --version`.
pub const EBPF_SHA256: &str = env!("LB_EBPF_SHA256");
