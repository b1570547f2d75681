//! Names and default sizes of the eBPF maps. Kernel map names are at most 15 bytes.

/// SOCKHASH: key = the socket's own cookie (u64, host order), value = the
/// socket itself, as a redirect target: the verdict sends a socket's bytes
/// to `LB_TARGET[record.peer_cookie]`. No program is attached to this map,
/// so a socket here receives redirects but its own data is not diverted.
/// The `sock_ops` program inserts clients at accept and servers at connect.
pub const TARGET: &str = "LB_TARGET";

/// HASH: a frontend's listen address ([`crate::conn::FrontendKey`]) ->
/// cookie of the network namespace it listens in: the `sock_ops` program
/// makes the clients accepted there redirect targets.
pub const FRONTENDS: &str = "LB_FRONTENDS";
/// Capacity of `LB_FRONTENDS`.
pub const MAX_FRONTENDS: u32 = 1024;

/// LRU_HASH: client cookie -> 1 for a client the `sock_ops` program made a
/// redirect target at its accept. It splices a server only if its client is
/// here: a client it could not make a target (the map full, no memory), or
/// whose entry aged out, has its server left to userspace, which makes the
/// client a target first. (A program of this type cannot look sockets up
/// in `LB_TARGET` itself: that takes a socket reference it may not release.)
pub const TARGET_OK: &str = "LB_TARGET_OK";

/// SOCKHASH: key = the socket's own cookie, value = the socket itself. The
/// sk_skb stream-verdict program is attached here; inserting a socket starts
/// the in-kernel splice for the bytes it receives.
pub const SPLICE: &str = "LB_SPLICE";

/// HASH: key = socket cookie, value = [`crate::conn::ConnTraffic`].
pub const CONN: &str = "LB_CONN";

/// PERCPU_ARRAY with one entry: [`crate::stats::DataplaneCounters`].
pub const COUNTERS: &str = "LB_COUNTERS";

/// HASH: [`crate::pool::SourceKey`] -> [`crate::pool::SourceStats`].
pub const SOURCES: &str = "LB_SOURCES";

/// HASH: [`crate::pool::ServerKey`] -> [`crate::pool::ServerStats`].
pub const SERVERS: &str = "LB_SERVERS";

/// PERCPU_HASH: [`crate::stats::ServerBytesKey`] -> [`crate::stats::ServerBytes`]:
/// bytes the verdict redirected per server, counted as they move (the
/// verdict makes an entry at a server's first byte). Only grows, so
/// `/metrics` byte counters never go down, and a scrape reads one small map
/// instead of every connection's records.
pub const SERVER_BYTES: &str = "LB_SERVER_BYTES";

/// HASH: worker index (u32) -> [`crate::pool::WorkerStats`].
pub const WORKERS: &str = "LB_WORKERS";

/// ARRAY_OF_MAPS: worker slot (u32) -> that slot's holder's RINGBUF of
/// [`crate::conn::FlowEvent`]s (each holder makes its own ring and puts it in
/// its slot).
pub const EVENTS: &str = "LB_EVENTS";
/// Size of each slot's ring (a power of two, whole pages): 2,048 events.
pub const EVENTS_RING_BYTES: u32 = 1 << 16;

/// Capacity of `LB_SOURCES` in the object file (pairs × workers; set at load).
pub const MAX_SOURCE_ENTRIES: u32 = 1 << 16;
/// Capacity of `LB_SERVERS` in the object file (servers × workers; set at load).
pub const MAX_SERVER_ENTRIES: u32 = 1 << 14;
/// Capacity of `LB_WORKERS`.
pub const MAX_WORKERS: u32 = 256;

/// Name of the sk_skb stream-verdict program in the object file.
pub const PROG_VERDICT: &str = "lb_verdict";

/// Name of the `sock_ops` program that splices sockets at `ESTABLISHED`.
pub const PROG_SETUP: &str = "lb_setup";
/// Pin of its cgroup attachment (a bpf link): it stays attached while pinned.
pub const LINK_SETUP: &str = "lb_setup_link";

/// Capacity of the socket maps and `LB_CONN` in the object file; lb sets
/// each map's capacity at load ([`Capacities`]).
pub const DEFAULT_MAX_SOCKETS: u32 = 1 << 18;

/// The capacities lb gives the maps it sizes at load, from the
/// configuration (`maxconn`, `workers`, servers and source pools, the
/// guard): what `kernel_memory` pays for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    /// `LB_CONN`: a record per socket of every connection lb holds or sets up.
    pub conn: u32,
    /// `LB_TARGET`: every socket of `conn`, and every client the frontends'
    /// listen backlogs can hold (accepted by the kernel, not yet by lb).
    pub target: u32,
    /// `LB_SPLICE`: every socket of `conn`.
    pub splice: u32,
    /// `LB_TARGET_OK`: every client of `target`.
    pub target_ok: u32,
    /// `LB_SERVERS`: a row per (server, worker).
    pub servers: u32,
    /// `LB_SOURCES`: a row per (source address, server, worker).
    pub sources: u32,
    /// `LB_SERVER_BYTES`: a row per server (of a backend).
    pub server_bytes: u32,
    /// `LB_GUARD_RATE` and `LB_GUARD_TOP`.
    pub guard_sources: u32,
    /// `LB_GUARD_DENY` and `LB_GUARD_ALLOW`, each.
    pub guard_rules: u32,
    /// `LB_FLOWS`: two entries per connection (packet plane).
    pub flows: u32,
    /// `LB_HANDSHAKE`: handshakes not yet joined (packet plane).
    pub handshakes: u32,
    /// `LB_FLOW_CTL`: one entry per connection (packet plane).
    pub flow_ctl: u32,
    /// `LB_ARRIVALS`: handshakes not yet joined, each side (packet plane).
    pub arrivals: u32,
}

impl Capacities {
    /// Each sized map's name with its capacity.
    pub fn by_map(&self) -> [(&'static str, u32); 15] {
        [
            (CONN, self.conn),
            (TARGET, self.target),
            (SPLICE, self.splice),
            (TARGET_OK, self.target_ok),
            (SERVERS, self.servers),
            (SOURCES, self.sources),
            (SERVER_BYTES, self.server_bytes),
            (GUARD_RATE, self.guard_sources),
            (GUARD_TOP, self.guard_sources),
            (GUARD_DENY, self.guard_rules),
            (GUARD_ALLOW, self.guard_rules),
            (FLOWS, self.flows),
            (HANDSHAKE, self.handshakes),
            (FLOW_CTL, self.flow_ctl),
            (ARRIVALS, self.arrivals),
        ]
    }
}

/// LPM_TRIE: source prefix (IPv6 bytes, IPv4 mapped) -> 1: the guard drops it.
pub const GUARD_DENY: &str = "LB_GUARD_DENY";
/// LPM_TRIE: source prefix -> 1: the guard lets it through, deny or rate aside.
pub const GUARD_ALLOW: &str = "LB_GUARD_ALLOW";
/// HASH: destination port (host order) -> 1: SYNs to it are rate limited.
pub const GUARD_PORTS: &str = "LB_GUARD_PORTS";
/// ARRAY with one entry: [`crate::guard::GuardConf`].
pub const GUARD_CONF: &str = "LB_GUARD_CONF";
/// LRU_HASH: source (16 bytes: an IPv4-mapped address, or an IPv6 /64 with
/// its last 8 bytes zero) -> [`crate::guard::GuardBucket`].
pub const GUARD_RATE: &str = "LB_GUARD_RATE";
/// PERCPU_ARRAY with one entry: [`crate::guard::GuardCounters`].
pub const GUARD_STATS: &str = "LB_GUARD_STATS";
/// LRU_HASH: source (as in [`GUARD_RATE`]) -> packets of it the guard dropped
/// (the top offenders).
pub const GUARD_TOP: &str = "LB_GUARD_TOP";
/// Capacity of each guard trie.
pub const MAX_GUARD_RULES: u32 = 1 << 16;
/// Capacity of the guard's per-source maps.
pub const MAX_GUARD_SOURCES: u32 = 1 << 16;

/// HASH: [`crate::packet::FlowKey`] -> [`crate::packet::Flow`]: the packet
/// plane's joined connections, one entry per direction.
pub const FLOWS: &str = "LB_FLOWS";
/// ARRAY_OF_MAPS: worker slot (u32) -> that slot's holder's RINGBUF of
/// [`crate::packet::PacketEnd`]s (each holder makes its own ring).
pub const PACKET_ENDS: &str = "LB_PACKET_ENDS";
/// Size of each slot's ring of ends: 16,384 ends.
pub const PACKET_ENDS_RING_BYTES: u32 = 1 << 20;
/// PERCPU_ARRAY with one entry: [`crate::packet::PacketCounters`].
pub const PACKET_COUNTERS: &str = "LB_PKT_COUNTERS";
/// Default capacity of `LB_FLOWS` (two entries per connection).
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 18;
/// LRU_HASH: socket cookie -> [`crate::packet::Handshake`], written by
/// `lb_setup` when the socket's handshake completes.
pub const HANDSHAKE: &str = "LB_HANDSHAKE";
/// Capacity of `LB_HANDSHAKE` (handshakes not yet joined; LRU).
pub const MAX_HANDSHAKES: u32 = 1 << 16;
/// Capacity of `LB_ARRIVALS` (LRU): two entries per connection (the
/// client's SYN, the server's SYN-ACK), kept from the handshake until the
/// join, which may wait in a listen backlog for seconds on a loaded host.
pub const MAX_ARRIVALS: u32 = 1 << 17;
/// HASH: connection id (u64) -> [`crate::packet::FlowCtl`], one per
/// joined connection.
pub const FLOW_CTL: &str = "LB_FLOW_CTL";
/// LRU_HASH: [`crate::packet::FlowKey`] of a handshake's packet (a SYN to
/// a frontend, any SYN-ACK) -> the interface index it arrived on: where
/// the packet plane sends that peer's packets once joined.
pub const ARRIVALS: &str = "LB_ARRIVALS";
/// Name of the packet plane's TC program in the object file (ingress).
pub const PROG_PACKET: &str = "lb_packet";
/// Name of its egress companion, which moves lb's own resets ([`crate::packet::TURN`])
/// on interfaces other than loopback (there, ingress sees them).
pub const PROG_PACKET_OUT: &str = "lb_packet_out";
/// Pin of an attachment to an interface (a tcx link): `lb_packet_<ifindex>`
/// (ingress) and `lb_packet_out_<ifindex>` (egress).
pub const LINK_PACKET_PREFIX: &str = "lb_packet_";

/// Name of the XDP guard program in the object file.
pub const PROG_GUARD: &str = "lb_guard";

/// The maps `lb` pins under its `pin_path`.
pub const PINNED: [&str; 24] = [
    TARGET,
    FRONTENDS,
    TARGET_OK,
    SPLICE,
    CONN,
    EVENTS,
    COUNTERS,
    SOURCES,
    SERVERS,
    SERVER_BYTES,
    WORKERS,
    GUARD_DENY,
    GUARD_ALLOW,
    GUARD_PORTS,
    GUARD_CONF,
    GUARD_RATE,
    GUARD_STATS,
    GUARD_TOP,
    FLOWS,
    PACKET_ENDS,
    PACKET_COUNTERS,
    HANDSHAKE,
    FLOW_CTL,
    ARRIVALS,
];

/// What this build expects of the pinned maps: each map's name with its key
/// and value sizes. `lb upgrade` hands a running instance's maps only to a
/// binary whose layout is the same.
#[cfg(feature = "user")]
pub fn layout() -> std::string::String {
    use core::mem::size_of;

    use crate::{
        conn::ConnTraffic,
        guard::{GuardBucket, GuardConf, GuardCounters},
        stats::{
            DataplaneCounters, ServerBytes, ServerBytesKey, ServerKey, ServerStats, SourceKey, SourceStats, WorkerStats,
        },
    };
    std::format!(
        "{TARGET}:8/4 {FRONTENDS}:20/8 {TARGET_OK}:8/1 {SPLICE}:8/4 {CONN}:8/{} {COUNTERS}:4/{} {SOURCES}:{}/{} {SERVERS}:{}/{} {SERVER_BYTES}:{}/{} {WORKERS}:4/{} \
         {GUARD_DENY}:20/1 {GUARD_ALLOW}:20/1 {GUARD_PORTS}:2/1 {GUARD_CONF}:4/{} {GUARD_RATE}:16/{} \
         {GUARD_STATS}:4/{} {GUARD_TOP}:16/8 {EVENTS}:4/4 ring {EVENTS_RING_BYTES}/{} \
         {FLOWS}:{}/{} {PACKET_ENDS}:4/4 ring {PACKET_ENDS_RING_BYTES}/{} {PACKET_COUNTERS}:4/{} {HANDSHAKE}:8/{} \
         {FLOW_CTL}:8/{} {ARRIVALS}:{}/4",
        size_of::<ConnTraffic>(),
        size_of::<DataplaneCounters>(),
        size_of::<SourceKey>(),
        size_of::<SourceStats>(),
        size_of::<ServerKey>(),
        size_of::<ServerStats>(),
        size_of::<ServerBytesKey>(),
        size_of::<ServerBytes>(),
        size_of::<WorkerStats>(),
        size_of::<GuardConf>(),
        size_of::<GuardBucket>(),
        size_of::<GuardCounters>(),
        size_of::<crate::conn::FlowEvent>(),
        size_of::<crate::packet::FlowKey>(),
        size_of::<crate::packet::Flow>(),
        size_of::<crate::packet::PacketEnd>(),
        size_of::<crate::packet::PacketCounters>(),
        size_of::<crate::packet::Handshake>(),
        size_of::<crate::packet::FlowCtl>(),
        size_of::<crate::packet::FlowKey>(),
    )
}
