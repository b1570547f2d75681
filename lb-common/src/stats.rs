//! Counters: what the verdict counts (per CPU), and what each worker
//! publishes for every (source IP, server) pair, every server and itself.
//! Each worker writes only the entries with its own `worker` index, so
//! readers sum over workers without races.
//!
//! The worker's counters are declared once, in [`worker_counters!`]: the
//! published struct, the list of names and helps that `lb stats`, the JSON
//! and `/metrics` are built from, and the atomics the proxy bumps all come
//! from that one list.

/// Index of the single entry of the per-CPU counters array.
pub const COUNTERS_KEY: u32 = 0;

/// What the verdict program did. Userspace sums the per-CPU slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DataplaneCounters {
    /// skbs redirected to the peer socket's egress.
    pub skbs_redirected: u64,
    /// Payload bytes in those skbs.
    pub bytes_redirected: u64,
    /// skbs whose peer was not in the TARGET map (left on the receiving
    /// socket; happens only while a connection is being torn down).
    pub peer_missing: u64,
    /// [`crate::conn::FlowEvent`]s sent to a holder.
    pub flow_events: u64,
    /// Flow events lost: the slot's ring buffer was full or missing (its
    /// holder looks at that direction at the next one).
    pub flow_events_lost: u64,
    /// Server sockets the `sock_ops` program spliced at `ESTABLISHED`.
    pub kernel_setups: u64,
    /// Sockets it could not insert (userspace inserted those connections).
    pub kernel_setup_failures: u64,
}
const _: () = assert!(core::mem::size_of::<DataplaneCounters>() == 56);

impl DataplaneCounters {
    /// Field-wise sum, for folding per-CPU slots.
    pub fn add(&self, other: &Self) -> Self {
        Self {
            skbs_redirected: self.skbs_redirected + other.skbs_redirected,
            bytes_redirected: self.bytes_redirected + other.bytes_redirected,
            peer_missing: self.peer_missing + other.peer_missing,
            flow_events: self.flow_events + other.flow_events,
            flow_events_lost: self.flow_events_lost + other.flow_events_lost,
            kernel_setups: self.kernel_setups + other.kernel_setups,
            kernel_setup_failures: self.kernel_setup_failures + other.kernel_setup_failures,
        }
    }
}

/// Whether a counter only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Only grows while the instance runs (Prometheus `counter`).
    Counter,
    /// A level: connections open now, clients queued now (Prometheus `gauge`).
    Gauge,
}

/// One worker counter: its field name, kind, help text and metric.
#[derive(Clone, Copy, Debug)]
pub struct CounterField {
    pub name: &'static str,
    pub kind: CounterKind,
    pub help: &'static str,
    /// Prometheus metric family (without `lb_` and `_total`), and the
    /// `reason` label when several fields share one family.
    pub metric: &'static str,
    pub reason: Option<&'static str>,
}

/// Declares the worker counters: see the module documentation.
macro_rules! worker_counters {
    ($( $(#[doc = $doc:literal])+ $kind:ident $name:ident => $metric:literal $(reason $reason:literal)?, )*) => {
        /// A worker's counters, as published in `LB_WORKERS` (see
        /// [`WorkerCounters::FIELDS`] for names and meanings).
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
        pub struct WorkerCounters {
            $( $(#[doc = $doc])+ pub $name: u64, )*
        }

        impl WorkerCounters {
            /// Every counter, in declaration order.
            pub const FIELDS: &'static [CounterField] = &[$(CounterField {
                name: stringify!($name),
                kind: CounterKind::$kind,
                help: concat!($($doc),+),
                metric: $metric,
                reason: worker_counters!(@reason $($reason)?),
            },)*];

            /// The values, in the order of [`Self::FIELDS`].
            pub fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$name),*].into_iter()
            }

            /// Field-wise sum (for totals over workers).
            pub fn add(&mut self, other: &Self) {
                $(self.$name += other.$name;)*
            }

            /// The [`CounterKind::Counter`] fields only, gauges zero: what a
            /// worker restarted in the same slot carries on from.
            pub fn counters_only(&self) -> Self {
                Self { $($name: if matches!(CounterKind::$kind, CounterKind::Counter) { self.$name } else { 0 },)* }
            }
        }

        /// The same counters as atomics, bumped by the proxy's tasks.
        #[cfg(feature = "user")]
        #[derive(Debug, Default)]
        pub struct AtomicWorkerCounters {
            $( $(#[doc = $doc])+ pub $name: core::sync::atomic::AtomicU64, )*
        }

        #[cfg(feature = "user")]
        impl AtomicWorkerCounters {
            /// A plain copy of every counter.
            pub fn snapshot(&self) -> WorkerCounters {
                WorkerCounters { $($name: self.$name.load(core::sync::atomic::Ordering::Relaxed),)* }
            }
        }
    };
    (@reason $r:literal) => { Some($r) };
    (@reason) => { None };
}

worker_counters! {
    /// Client connections accepted.
    Counter accepted => "connections",
    /// Client connections open now (spliced, copied, or waiting for a server).
    Gauge active => "connections_active",
    /// Client connections that ended.
    Counter closed => "connections_closed",
    /// Clients reset without a server: any reason below, or none reachable.
    Counter rejected => "rejected",
    /// Of `rejected`: every source address of every tried server was out of ports.
    Counter no_source_port => "rejected_by_reason" reason "no_source_port",
    /// Of `rejected`: the backend queue was full or `timeouts.queue` passed.
    Counter queue_rejected => "rejected_by_reason" reason "queue",
    /// Of `rejected`: no server could take new connections (down, drained, disabled, weight 0).
    Counter no_server_up => "rejected_by_reason" reason "no_server_up",
    /// Of `rejected`: lb itself had no descriptor or memory for the server socket
    /// (EMFILE, ENFILE, ENOBUFS, ENOMEM); no server is blamed.
    Counter no_local_resources => "rejected_by_reason" reason "local_resources",
    /// Connect attempts to servers that failed (refused, timed out).
    Counter connect_failures => "connect_failures",
    /// Connections ended by a reset forwarded from one side to the other.
    Counter aborted => "aborted",
    /// Connections closed because neither side sent a byte for `timeouts.idle`.
    Counter idle_closed => "idle_closed",
    /// Clients closed for sending nothing within their frontend's `first_byte_timeout`.
    Counter first_byte_timeouts => "first_byte_timeouts",
    /// Clients of an `sni` frontend closed for no complete ClientHello within `timeouts.client_hello`.
    Counter client_hello_timeouts => "client_hello_timeouts",
    /// Clients of an `sni` frontend closed for a ClientHello lb cannot read (malformed, over 16 KiB).
    Counter client_hello_invalid => "client_hello_invalid",
    /// Clients waiting now for a server slot.
    Gauge queued => "queued",
    /// Connections the kernel plane copied (whole or one side) in userspace
    /// because a side had closed before its splice, or a kernel map was full.
    Counter userspace_fallbacks => "userspace_fallbacks",
    /// Of `userspace_fallbacks`: a kernel map had no room (or the kernel no
    /// memory) for the connection's entries; `maps` in `lb stats` says which
    /// is full, and `kernel_memory` sizes them.
    Counter kernel_maps_full => "kernel_maps_full",
    /// Bytes client -> server copied in userspace.
    Counter userspace_bytes_in => "userspace_bytes_in",
    /// Bytes server -> client copied in userspace.
    Counter userspace_bytes_out => "userspace_bytes_out",
    /// Connections joined on the packet plane: the kernel rewrites their
    /// packets, lb keeps no socket for them.
    Counter packet_joined => "packet_joined",
    /// Connections of a packet-plane frontend kept on the sockmap plane: the
    /// two handshakes' timestamp options differ.
    Counter packet_kept_timestamps => "packet_kept" reason "timestamps",
    /// Of those kept: an MSS one path advertised is larger than the other side accepts.
    Counter packet_kept_mss => "packet_kept" reason "mss",
    /// Of those kept: a side closed or reset while lb joined them.
    Counter packet_kept_closed => "packet_kept" reason "closed",
    /// Of those kept: bytes kept flowing through lb, never a quiet moment
    /// to join them (a sender that never pauses).
    Counter packet_kept_busy => "packet_kept" reason "busy",
    /// Of those kept: the flow map was full or refused the entries, or
    /// `lb_setup` recorded no handshake.
    Counter packet_kept_map => "packet_kept" reason "map",
    /// Of those kept: the connection does not run over this host's
    /// loopback in IPv4, the only path the program watches so far.
    Counter packet_kept_path => "packet_kept" reason "path",
}
const _: () = assert!(core::mem::size_of::<WorkerCounters>() == 26 * 8);

/// Value of `LB_WORKERS`, keyed by worker index (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WorkerStats {
    pub pid: u64,
    /// Publication sequence: odd while the worker is rewriting its
    /// `LB_SERVERS`/`LB_SOURCES` entries, even once they agree with this
    /// entry. Readers retry while it is odd or changes under them. It
    /// grows by 2 at every publication (every 100 ms), so a reader that
    /// sees it move knows the worker is alive and its figures current.
    pub seq: u64,
    pub counters: WorkerCounters,
}
const _: () = assert!(core::mem::size_of::<WorkerStats>() == 16 + 26 * 8);

/// Key of `LB_SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceKey {
    /// Local (source) address, IPv6 bytes (IPv4 as `::ffff:a.b.c.d`), network
    /// order; `::` when no pool is configured.
    pub source_ip: [u8; 16],
    /// Server address, IPv6 bytes as `source_ip`.
    pub server_ip: [u8; 16],
    /// Server port, host order.
    pub server_port: u16,
    pub worker: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 40);

/// Value of `LB_SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
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
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServerKey {
    /// IPv6 bytes (IPv4 as `::ffff:a.b.c.d`), network order.
    pub server_ip: [u8; 16],
    /// Host order.
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
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServerStats {
    /// Connections to this server open now.
    pub active: u64,
    /// Connections made, ever.
    pub total: u64,
    /// Connect attempts that failed (refused, timed out, no source port).
    pub connect_failures: u64,
    /// Client -> server bytes lb copied itself (the userspace plane, a
    /// copied side, a PROXY header) in connections that have ended; the
    /// kernel's are in `LB_SERVER_BYTES`.
    pub bytes_in: u64,
    /// Server -> client bytes lb copied itself, as `bytes_in`.
    pub bytes_out: u64,
    /// 0 up, 1 down (health check), 2 drain, 3 maint (disabled), 4 removed.
    pub state: u32,
    pub weight: u32,
}
const _: () = assert!(core::mem::size_of::<ServerStats>() == 48);

/// Key of `LB_SERVER_BYTES`: a server of a backend, as in a connection's
/// records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServerBytesKey {
    /// IPv6 bytes (IPv4 as `::ffff:a.b.c.d`), network order.
    pub server_ip: [u8; 16],
    /// Host order.
    pub server_port: u16,
    /// Index of the backend in the configuration.
    pub backend: u16,
}
const _: () = assert!(core::mem::size_of::<ServerBytesKey>() == 20);

/// Value of `LB_SERVER_BYTES` (per CPU): what the verdict redirected for
/// the server's connections, live and ended. Only grows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServerBytes {
    /// Client -> server.
    pub bytes_in: u64,
    /// Server -> client.
    pub bytes_out: u64,
}
const _: () = assert!(core::mem::size_of::<ServerBytes>() == 16);

#[cfg(feature = "user")]
crate::pod!(
    DataplaneCounters,
    WorkerStats,
    SourceKey,
    SourceStats,
    ServerKey,
    ServerStats,
    ServerBytesKey,
    ServerBytes
);
