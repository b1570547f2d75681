//! Counters published by userspace for every (source IP, server) pair, every
//! server and every worker process. Each worker writes only the entries with
//! its own `worker` index, so readers sum over workers without races.

/// Key of `LB_SOURCES`. Addresses are IPv6 (IPv4 as `::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Local (source) address; `::` when no pool is configured.
    pub source_ip: [u8; 16],
    pub server_ip: [u8; 16],
    pub server_port: u16,
    pub worker: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 40);

/// Value of `LB_SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Connections from this source address to this server open right now
    /// (each holds one local port of the 4-tuple space).
    pub ports_in_use: u64,
    /// Connections made, ever.
    pub connects: u64,
    /// Connect attempts refused locally for lack of a free port (EADDRNOTAVAIL).
    pub exhausted: u64,
}
const _: () = assert!(core::mem::size_of::<SourceStats>() == 24);

/// Key of `LB_SERVERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServerKey {
    pub server_ip: [u8; 16],
    pub server_port: u16,
    pub worker: u16,
    /// Index of the backend in the configuration.
    pub backend: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServerKey>() == 24);

/// Value of `LB_SERVERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections to this server open now.
    pub active: u64,
    /// Connections made, ever.
    pub total: u64,
    /// Connect attempts that failed (refused, timed out, no source port).
    pub connect_failures: u64,
    /// Client -> server bytes of connections that have ended.
    pub bytes_in: u64,
    /// Server -> client bytes of connections that have ended.
    pub bytes_out: u64,
    /// 0 up, 1 down (health check), 2 drain, 3 maint (disabled).
    pub state: u32,
    pub weight: u32,
}
const _: () = assert!(core::mem::size_of::<ServerStats>() == 48);

/// Value of `LB_WORKERS`, keyed by worker index (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub pid: u64,
    pub accepted: u64,
    pub active: u64,
    /// Clients closed without a server: none reachable, no source port,
    /// queue full or queue timeout.
    pub rejected: u64,
    /// Of `rejected`: every source address of every server was out of ports.
    pub no_source_port: u64,
    /// Of `rejected`: waited `timeouts.queue` or found the queue full.
    pub queue_rejected: u64,
    pub connect_failures: u64,
    /// Spliced connections closed by `timeouts.idle`.
    pub idle_closed: u64,
    pub userspace_fallbacks: u64,
    /// Clients waiting now for a server slot (server `maxconn`).
    pub queued: u64,
    /// Of `rejected`: no server could take new connections.
    pub no_server_up: u64,
    /// Publication sequence: odd while the worker is rewriting its
    /// `LB_SERVERS`/`LB_SOURCES` entries, even once they agree with this
    /// entry. Readers retry while it is odd or changes under them. It
    /// grows by 2 at every publication (every 100 ms), so a reader that
    /// sees it move knows the worker is alive and its figures current.
    pub seq: u64,
}
const _: () = assert!(core::mem::size_of::<WorkerStats>() == 96);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for SourceStats {}
    unsafe impl aya::Pod for ServerKey {}
    unsafe impl aya::Pod for ServerStats {}
    unsafe impl aya::Pod for WorkerStats {}
}
