//! Every map of the object, declared with BTF so bpftool prints field names.
//! Names come from `lb_common::maps`; sizes are overridden at load time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
    macros::btf_map,
};
use lb_common::{
    conn::{ConnTraffic, FlowEvent, FrontendKey},
    guard::{GuardBucket, GuardConf, GuardCounters},
    maps::{
        DEFAULT_MAX_FLOWS, DEFAULT_MAX_SOCKETS, EVENTS_RING_BYTES, MAX_ARRIVALS, MAX_FRONTENDS, MAX_GUARD_RULES,
        MAX_GUARD_SOURCES, MAX_HANDSHAKES, MAX_SERVER_ENTRIES, MAX_SOURCE_ENTRIES, MAX_WORKERS, PACKET_ENDS_RING_BYTES,
    },
    packet::{Flow, FlowCtl, FlowKey, Handshake, PacketCounters, PacketEnd},
    stats::{
        DataplaneCounters, ServerBytes, ServerBytesKey, ServerKey, ServerStats, SourceKey, SourceStats, WorkerStats,
    },
};

const MAX: usize = DEFAULT_MAX_SOCKETS as usize;

/// Socket's own cookie -> itself, as a redirect target (no program).
#[btf_map(name = "LB_TARGET")]
pub static LB_TARGET: SockHash<u64, MAX> = SockHash::new();

/// Frontend listen address -> cookie of the namespace it listens in.
#[btf_map(name = "LB_FRONTENDS")]
pub static LB_FRONTENDS: HashMap<FrontendKey, u64, { MAX_FRONTENDS as usize }> = HashMap::new();

/// Clients the `sock_ops` program made targets at their accept (sized at load).
#[btf_map(name = "LB_TARGET_OK")]
pub static LB_TARGET_OK: LruHashMap<u64, u8, MAX> = LruHashMap::new();

/// Socket's own cookie -> itself; the verdict program is attached here.
#[btf_map(name = "LB_SPLICE")]
pub static LB_SPLICE: SockHash<u64, MAX> = SockHash::new();

/// Socket cookie -> connection record (identity from userspace, traffic from
/// the verdict). Not preallocated: a record's memory is taken when it is
/// written, and the kernel's `memlock` figure for the map counts them.
#[btf_map(name = "LB_CONN")]
pub static LB_CONN: HashMap<u64, ConnTraffic, MAX, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Worker slot -> its holder's ring of flow events (the holders put them in).
#[btf_map(name = "LB_EVENTS")]
pub static LB_EVENTS: ArrayOfMaps<RingBuf<FlowEvent, { EVENTS_RING_BYTES as usize }>, { MAX_WORKERS as usize }> =
    ArrayOfMaps::new();

/// One slot per CPU.
#[btf_map(name = "LB_COUNTERS")]
pub static LB_COUNTERS: PerCpuArray<DataplaneCounters, 1> = PerCpuArray::new();

/// Per (source IP, server, worker) port counts, written by userspace.
#[btf_map(name = "LB_SOURCES")]
pub static LB_SOURCES: HashMap<SourceKey, SourceStats, { MAX_SOURCE_ENTRIES as usize }> = HashMap::new();

/// Per (server, worker) connection and byte counts, written by userspace.
#[btf_map(name = "LB_SERVERS")]
pub static LB_SERVERS: HashMap<ServerKey, ServerStats, { MAX_SERVER_ENTRIES as usize }> = HashMap::new();

/// Bytes the verdict redirected per server (sized at load).
#[btf_map(name = "LB_SERVER_BYTES")]
pub static LB_SERVER_BYTES: PerCpuHashMap<ServerBytesKey, ServerBytes, { MAX_SERVER_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// Per worker process counters, written by userspace.
#[btf_map(name = "LB_WORKERS")]
pub static LB_WORKERS: HashMap<u32, WorkerStats, { MAX_WORKERS as usize }> = HashMap::new();

/// Source prefixes the guard drops.
#[btf_map(name = "LB_GUARD_DENY")]
pub static LB_GUARD_DENY: LpmTrie<[u8; 16], u8, { MAX_GUARD_RULES as usize }> = LpmTrie::new();

/// Source prefixes the guard always lets through.
#[btf_map(name = "LB_GUARD_ALLOW")]
pub static LB_GUARD_ALLOW: LpmTrie<[u8; 16], u8, { MAX_GUARD_RULES as usize }> = LpmTrie::new();

/// The frontends' ports (host order): SYNs to them are rate limited.
#[btf_map(name = "LB_GUARD_PORTS")]
pub static LB_GUARD_PORTS: HashMap<u16, u8, 1024> = HashMap::new();

/// The guard's settings, written by userspace.
#[btf_map(name = "LB_GUARD_CONF")]
pub static LB_GUARD_CONF: Array<GuardConf, 1> = Array::new();

/// Per-source SYN token buckets (an IPv4 address, or an IPv6 /64).
#[btf_map(name = "LB_GUARD_RATE")]
pub static LB_GUARD_RATE: LruHashMap<[u8; 16], GuardBucket, { MAX_GUARD_SOURCES as usize }> = LruHashMap::new();

/// The guard's counters, one slot per CPU.
#[btf_map(name = "LB_GUARD_STATS")]
pub static LB_GUARD_STATS: PerCpuArray<GuardCounters, 1> = PerCpuArray::new();

/// Packets dropped per source, keyed as `LB_GUARD_RATE` (the top offenders).
#[btf_map(name = "LB_GUARD_TOP")]
pub static LB_GUARD_TOP: LruHashMap<[u8; 16], u64, { MAX_GUARD_SOURCES as usize }> = LruHashMap::new();

/// The packet plane's joined connections, one entry per direction.
#[btf_map(name = "LB_FLOWS")]
pub static LB_FLOWS: HashMap<FlowKey, Flow, { DEFAULT_MAX_FLOWS as usize }> = HashMap::new();

/// Worker slot -> its holder's ring of ended packet-plane connections.
#[btf_map(name = "LB_PACKET_ENDS")]
pub static LB_PACKET_ENDS: ArrayOfMaps<
    RingBuf<PacketEnd, { PACKET_ENDS_RING_BYTES as usize }>,
    { MAX_WORKERS as usize },
> = ArrayOfMaps::new();

/// The packet plane's counters, one slot per CPU.
#[btf_map(name = "LB_PKT_COUNTERS")]
pub static LB_PKT_COUNTERS: PerCpuArray<PacketCounters, 1> = PerCpuArray::new();

/// Scratch space of the packet plane's program, one slot per CPU (not
/// pinned: nothing outside the program reads it).
#[btf_map(name = "LB_PKT_SCRATCH")]
pub static LB_PKT_SCRATCH: PerCpuArray<[u32; 4], 1> = PerCpuArray::new();

/// What lb tells the program about a joined connection (`FlowCtl`).
#[btf_map(name = "LB_FLOW_CTL")]
pub static LB_FLOW_CTL: HashMap<u64, FlowCtl, { DEFAULT_MAX_FLOWS as usize }> = HashMap::new();

/// Socket cookie -> its handshake, recorded by `lb_setup` for the packet
/// plane's join.
#[btf_map(name = "LB_HANDSHAKE")]
pub static LB_HANDSHAKE: LruHashMap<u64, Handshake, { MAX_HANDSHAKES as usize }> = LruHashMap::new();

/// A handshake's packet (a SYN to a frontend, any SYN-ACK) -> the
/// interface it arrived on: where the packet plane sends that peer's
/// packets once its connection is joined (`lb_common::maps::ARRIVALS`).
#[btf_map(name = "LB_ARRIVALS")]
pub static LB_ARRIVALS: LruHashMap<FlowKey, u32, { MAX_ARRIVALS as usize }> = LruHashMap::new();
