//! `lb`: a TCP load balancer for very many long-lived connections. Bytes are
//! spliced between client and server sockets inside the kernel (eBPF sockmap),
//! or copied in userspace where the kernel path is not available.

pub mod backend;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod publish;
pub mod report;
pub mod runtime;
pub mod select;
pub mod stats;
pub mod supervisor;
pub mod sys;

/// The eBPF object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
