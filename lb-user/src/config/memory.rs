//! `kernel_memory`: what lb's eBPF maps may take of the kernel's memory,
//! and the map sizes (and default `maxconn`) that fit it.
//!
//! Bytes per entry, as Linux 6.x lays the maps out on 64-bit machines
//! (`kernel/bpf/hashtab.c`, `net/core/sock_map.c`, `net/core/skmsg.c`),
//! checked on 6.18 against the `memlock` figure the kernel reports for
//! each map and against slab growth:
//! - a hash map has 16 bytes of bucket per power-of-two slot of its
//!   capacity, and an element of 48 bytes of header plus key and value,
//!   each rounded up to 8. A preallocated map allocates every element at
//!   load (one more per CPU); `LB_CONN` is not preallocated, and its
//!   elements come from the kernel's 192-byte cache as they are made;
//! - an LRU hash map is preallocated, without the per-CPU spares;
//! - a sockhash element is 56 bytes, from the 64-byte cache, and the first
//!   socket map a socket joins gives it a psock (`struct sk_psock`, from the
//!   1 KiB cache), which lb counts with `LB_TARGET` (every socket lb
//!   splices is a redirect target);
//! - an LPM trie node (the guard's lists) takes about 64 bytes;
//! - each worker slot's flow-event ring takes its size and two pages.
//!
//! Budgets are capacities, not use: a map of 10,000 entries is counted at
//! 10,000 whether or not they are filled.

use lb_common::{
    conn::ConnTraffic,
    guard::GuardBucket,
    maps::{
        Capacities, EVENTS_RING_BYTES, GUARD_ALLOW, GUARD_DENY, GUARD_RATE, GUARD_TOP, MAX_ARRIVALS, MAX_FRONTENDS,
        MAX_GUARD_RULES, MAX_GUARD_SOURCES, MAX_HANDSHAKES, MAX_WORKERS, PACKET_ENDS_RING_BYTES,
    },
    packet::{Flow, FlowKey, Handshake},
    stats::{ServerBytesKey, ServerKey, ServerStats, SourceKey, SourceStats, WorkerStats},
};
use toml::Spanned;

use super::{
    ConfigError, FD_RESERVE, MAX_MAXCONN, MAX_WORKERS as MAX_WORKERS_CFG, error::Locator, fds_needed, host::Host,
};

/// Default `kernel_memory`.
pub const DEFAULT_KERNEL_MEMORY: u64 = 256 << 20;

/// Listen backlog of each frontend socket (one per frontend per worker; the
/// kernel holds at most one more, and no more than `net.core.somaxconn`).
pub const BACKLOG: u32 = 4096;

/// Bucket of a hash or socket map, per power-of-two slot.
const BUCKET: u64 = 16;
/// Header of a hash map element (`struct htab_elem`), before its key.
const HTAB_ELEM: u64 = 48;
/// A sockhash element with an 8-byte key (56 bytes, from the 64-byte cache).
const SOCKHASH_ELEM: u64 = 64;
/// The psock of a socket in a socket map (`struct sk_psock`, 1 KiB cache).
pub const PSOCK: u64 = 1024;
/// An LPM trie node with a 16-byte key and 1-byte value.
const LPM_NODE: u64 = 64;
/// A page.
const PAGE: u64 = 4096;

/// Key and value sizes of the maps (as in `lb_common::maps::layout`).
const CONN_RECORD: u64 = size_of::<ConnTraffic>() as u64;
const SERVER_KEY: u64 = size_of::<ServerKey>() as u64;
const SERVER_STATS: u64 = size_of::<ServerStats>() as u64;
const SOURCE_KEY: u64 = size_of::<SourceKey>() as u64;
const SOURCE_STATS: u64 = size_of::<SourceStats>() as u64;
const WORKER_STATS: u64 = size_of::<WorkerStats>() as u64;
const GUARD_BUCKET: u64 = size_of::<GuardBucket>() as u64;
const SERVER_BYTES_KEY: u64 = size_of::<ServerBytesKey>() as u64;
const FLOW_KEY: u64 = size_of::<FlowKey>() as u64;
const FLOW: u64 = size_of::<Flow>() as u64;
const HANDSHAKE: u64 = size_of::<Handshake>() as u64;

fn r8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

fn buckets(capacity: u32) -> u64 {
    BUCKET * u64::from(capacity.max(1)).next_power_of_two()
}

/// A preallocated hash map (`BPF_MAP_TYPE_HASH`).
fn hash(key: u64, value: u64, capacity: u32, cpus: u32) -> u64 {
    (HTAB_ELEM + r8(key) + r8(value)) * (u64::from(capacity) + u64::from(cpus)) + buckets(capacity)
}

/// A preallocated per-CPU hash map: an element with a pointer to its
/// per-CPU values, and the values of every CPU.
fn per_cpu_hash(key: u64, value: u64, capacity: u32, cpus: u32) -> u64 {
    (HTAB_ELEM + r8(key) + 8 + r8(value) * u64::from(cpus)) * u64::from(capacity) + buckets(capacity)
}

/// A hash map whose elements are allocated as they are made
/// (`BPF_F_NO_PREALLOC`), full: from the kernel's size classes.
fn dynamic_hash(key: u64, value: u64, capacity: u32) -> u64 {
    let elem = HTAB_ELEM + r8(key) + r8(value) + 8;
    let class = [96, 128, 192, 256, 512, 1024, 2048, 4096].into_iter().find(|c| *c >= elem).unwrap_or(elem);
    class * u64::from(capacity) + buckets(capacity)
}

/// An LRU hash map.
fn lru(key: u64, value: u64, capacity: u32) -> u64 {
    (HTAB_ELEM + r8(key) + r8(value)) * u64::from(capacity) + buckets(capacity)
}

/// A sockhash, full; `psock`: count a psock per entry.
fn sockhash(capacity: u32, psock: bool) -> u64 {
    (SOCKHASH_ELEM + if psock { PSOCK } else { 0 }) * u64::from(capacity) + buckets(capacity)
}

/// What lb's maps are sized from.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub maxconn: u32,
    pub workers: u32,
    pub frontends: u32,
    /// Servers over all backends.
    pub servers: u32,
    /// (server, source address) pairs over all backends (a backend without
    /// a pool counts one per server).
    pub pairs: u32,
    /// The largest pool (1 without one).
    pub largest_pool: u32,
    /// The kernel plane may run (`dataplane` is not `userspace`).
    pub kernel: bool,
    pub guard: bool,
    /// A frontend joins connections on the packet plane (`LB_FLOWS`).
    pub packet: bool,
    /// Possible CPUs (`/sys/devices/system/cpu/possible`).
    pub cpus: u32,
}

/// Rows beyond the configuration's in `LB_SERVERS` and `LB_SOURCES`, for
/// servers added at run time: each server (or source pair) twice (a removed
/// server keeps its row while its connections last), and this many more.
pub const RUNTIME_SERVERS: u32 = 64;

impl Shape {
    /// The capacity of every map lb sizes.
    pub fn capacities(&self) -> Capacities {
        let w = self.workers.max(1);
        // Each worker takes ceil(maxconn / workers): at most `workers - 1`
        // more than maxconn in all.
        let conns = if self.kernel { self.maxconn.saturating_add(w) } else { 0 };
        let sockets = conns.saturating_mul(2).max(1);
        // Clients the kernel accepted: every one lb holds or sets up, and
        // every one a listen backlog can hold (each frontend has one per
        // worker, up to BACKLOG + 1 deep).
        let backlogs = w.saturating_mul(self.frontends).saturating_mul(BACKLOG + 1);
        let clients = if self.kernel { conns.saturating_add(backlogs) } else { 1 };
        let rows = |per_worker: u32| per_worker.saturating_mul(w).max(1);
        Capacities {
            conn: sockets,
            // Clients are targets from the kernel's accept on.
            target: if self.kernel { sockets.saturating_add(backlogs) } else { 1 },
            splice: sockets,
            target_ok: clients,
            servers: rows(self.servers.saturating_mul(2).saturating_add(RUNTIME_SERVERS)),
            sources: rows(
                self.pairs.saturating_mul(2).saturating_add(RUNTIME_SERVERS.saturating_mul(self.largest_pool.max(1))),
            ),
            server_bytes: self.servers.saturating_mul(2).saturating_add(RUNTIME_SERVERS),
            guard_sources: if self.guard { MAX_GUARD_SOURCES } else { 1 },
            guard_rules: if self.guard { MAX_GUARD_RULES } else { 1 },
            flows: if self.kernel && self.packet { sockets } else { 1 },
            handshakes: if self.kernel && self.packet { MAX_HANDSHAKES } else { 1 },
            flow_ctl: if self.kernel && self.packet { conns.max(1) } else { 1 },
            arrivals: if self.kernel && self.packet { MAX_ARRIVALS } else { 1 },
        }
    }

    /// Every map's capacity and the bytes it may take.
    pub fn plan(&self) -> Vec<MapCost> {
        let c = self.capacities();
        let cpus = self.cpus.max(1);
        let cost = |name: &'static str, capacity: u32, bytes: u64| MapCost { name, capacity, bytes };
        let rings = u64::from(self.workers) * (u64::from(EVENTS_RING_BYTES) + 2 * PAGE);
        let ends = u64::from(self.workers) * (u64::from(PACKET_ENDS_RING_BYTES) + 2 * PAGE);
        vec![
            cost(lb_common::maps::CONN, c.conn, dynamic_hash(8, CONN_RECORD, c.conn)),
            cost(lb_common::maps::TARGET, c.target, sockhash(c.target, true)),
            cost(lb_common::maps::SPLICE, c.splice, sockhash(c.splice, false)),
            cost(lb_common::maps::TARGET_OK, c.target_ok, lru(8, 1, c.target_ok)),
            cost(lb_common::maps::SERVERS, c.servers, hash(SERVER_KEY, SERVER_STATS, c.servers, cpus)),
            cost(lb_common::maps::SOURCES, c.sources, hash(SOURCE_KEY, SOURCE_STATS, c.sources, cpus)),
            cost(
                lb_common::maps::SERVER_BYTES,
                c.server_bytes,
                per_cpu_hash(SERVER_BYTES_KEY, 16, c.server_bytes, cpus),
            ),
            cost(lb_common::maps::WORKERS, MAX_WORKERS, hash(4, WORKER_STATS, MAX_WORKERS, cpus)),
            cost(lb_common::maps::FRONTENDS, MAX_FRONTENDS, hash(20, 8, MAX_FRONTENDS, cpus)),
            cost(lb_common::maps::EVENTS, self.workers, rings + 8 * u64::from(MAX_WORKERS)),
            cost(lb_common::maps::GUARD_PORTS, 1024, hash(2, 1, 1024, cpus)),
            cost(GUARD_RATE, c.guard_sources, lru(16, GUARD_BUCKET, c.guard_sources)),
            cost(GUARD_TOP, c.guard_sources, lru(16, 8, c.guard_sources)),
            cost(GUARD_DENY, c.guard_rules, LPM_NODE * u64::from(c.guard_rules)),
            cost(GUARD_ALLOW, c.guard_rules, LPM_NODE * u64::from(c.guard_rules)),
            cost(lb_common::maps::FLOWS, c.flows, hash(FLOW_KEY, FLOW, c.flows, cpus)),
            cost(lb_common::maps::HANDSHAKE, c.handshakes, lru(8, HANDSHAKE, c.handshakes)),
            cost(lb_common::maps::FLOW_CTL, c.flow_ctl, hash(8, 12, c.flow_ctl, cpus)),
            cost(lb_common::maps::ARRIVALS, c.arrivals, lru(FLOW_KEY, 4, c.arrivals)),
            cost(lb_common::maps::PACKET_ENDS, self.workers, if self.kernel && self.packet { ends } else { 0 }),
        ]
    }

    /// Bytes of every map together.
    pub fn bytes(&self) -> u64 {
        self.plan().iter().map(|m| m.bytes).sum()
    }

    /// The largest `maxconn` whose maps fit `budget` (0: none does).
    pub fn max_maxconn(&self, budget: u64, cap: u32) -> u32 {
        let fits = |m: u32| Shape { maxconn: m, ..*self }.bytes() <= budget;
        if !fits(1) {
            return 0;
        }
        let (mut lo, mut hi) = (1u32, cap);
        if fits(hi) {
            return hi;
        }
        // fits(lo) and !fits(hi): bytes grow with maxconn.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) { lo = mid } else { hi = mid }
        }
        lo
    }
}

/// One map's share of `kernel_memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCost {
    pub name: &'static str,
    pub capacity: u32,
    pub bytes: u64,
}

/// `n` bytes as the config writes sizes: `"1.5GiB"`, `"300MiB"`, `"12KiB"`.
pub fn human(n: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, unit) in units {
        if n >= scale {
            // Rounded up: "at least" figures must not fall short.
            let tenths = (n * 10).div_ceil(scale);
            return if tenths % 10 == 0 || tenths >= 1000 {
                format!("{}{unit}", n.div_ceil(scale))
            } else {
                format!("{}.{}{unit}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{n}B")
}

/// Where a budget error points: the key that makes the maps big, or
/// `kernel_memory` itself.
pub struct Blame<'a> {
    pub kernel_memory: Option<&'a Spanned<String>>,
    pub maxconn: Option<&'a Spanned<u32>>,
    /// The largest `source_pool` key (global or a backend's), if any.
    pub pool: Option<&'a Spanned<Vec<Spanned<String>>>>,
}

/// The global `maxconn`: as written if each worker's share fits the
/// open-files limit and the maps fit `budget`, else an error saying what
/// would; unset, as many as fit both. `shape.maxconn` is ignored.
///
/// `joined_only`: every frontend joins its connections on the packet
/// plane, where a joined connection holds no descriptor. Only
/// connections being set up, or kept on the sockmap plane, hold two; a
/// written `maxconn` is then not bounded by the open-files limit (a
/// connection that finds no descriptor is reset and counted, as on any
/// plane). Unset, it stays what the open-files rule allows.
pub fn maxconn(
    loc: &Locator<'_>,
    host: &dyn Host,
    blame: &Blame<'_>,
    budget: u64,
    shape: Shape,
    joined_only: bool,
) -> Result<u32, ConfigError> {
    let workers = shape.workers;
    let hard = host.nofile_hard_limit();
    let fit = (hard.saturating_sub(FD_RESERVE) / 2).min(u64::from(MAX_MAXCONN)) as u32;
    fixed_maps_fit(loc, blame, budget, shape)?;
    let mem_fit = if shape.kernel { shape.max_maxconn(budget, MAX_MAXCONN) } else { MAX_MAXCONN };
    let Some(m) = blame.maxconn else { return Ok(fit.saturating_mul(workers).min(mem_fit).clamp(1, MAX_MAXCONN)) };
    let v = *m.get_ref();
    if v == 0 || v > MAX_MAXCONN {
        return Err(loc.at(m, format!("maxconn = {v}: must be between 1 and {MAX_MAXCONN}")));
    }
    let per_worker = v.div_ceil(workers);
    if fds_needed(per_worker) > hard && !joined_only {
        let need_workers = u64::from(v).div_ceil(u64::from(fit.max(1)));
        let fix = if need_workers <= u64::from(MAX_WORKERS_CFG) {
            format!("set workers = {need_workers} or more, lower maxconn, or raise LimitNOFILE")
        } else {
            "lower maxconn or raise LimitNOFILE".to_owned()
        };
        return Err(loc.at(
            m,
            format!(
                "maxconn = {v}: {per_worker} connections per worker need {} open files, but the hard limit \
                 (ulimit -Hn) is {hard}; {fix}",
                fds_needed(per_worker)
            ),
        ));
    }
    if v > mem_fit {
        let need = Shape { maxconn: v, ..shape }.bytes();
        return Err(loc.at(
            m,
            format!(
                "maxconn = {v}: the kernel maps for it take {}, more than kernel_memory ({}); raise kernel_memory \
                 to at least {} or lower maxconn (at most {mem_fit} fit)",
                human(need),
                human(budget),
                human(need)
            ),
        ));
    }
    Ok(v)
}

/// Refuses a configuration whose maps do not fit `budget` even without
/// connections (servers × source addresses × workers, the guard).
fn fixed_maps_fit(loc: &Locator<'_>, blame: &Blame<'_>, budget: u64, shape: Shape) -> Result<(), ConfigError> {
    let empty = Shape { maxconn: 1, ..shape };
    let need = empty.bytes();
    if need <= budget {
        return Ok(());
    }
    let plan = empty.plan();
    let largest = plan.iter().max_by_key(|m| m.bytes).map_or("", |m| m.name);
    let what = format!(
        "the kernel maps take {} before any connection (the largest: {largest}), more than kernel_memory ({})",
        human(need),
        human(budget)
    );
    let fix = format!("raise kernel_memory to more than {}", human(need));
    Err(match (largest, blame.pool, blame.kernel_memory) {
        (lb_common::maps::SOURCES, Some(p), _) => loc.at(
            p,
            format!(
                "source_pool: {} (server, source address) pairs × {} workers: {what}; {fix} or use fewer addresses",
                shape.pairs, shape.workers
            ),
        ),
        (_, _, Some(k)) => loc.at(k, format!("kernel_memory = \"{}\": {what}; {fix}", k.get_ref())),
        _ => loc.err(0, format!("kernel_memory (default {}): {what}; {fix}", human(DEFAULT_KERNEL_MEMORY))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(maxconn: u32, workers: u32) -> Shape {
        Shape {
            maxconn,
            workers,
            frontends: 1,
            servers: 3,
            pairs: 12,
            largest_pool: 4,
            kernel: true,
            guard: false,
            packet: false,
            cpus: 2,
        }
    }

    /// The figures the kernel reported (`memlock`, Linux 6.18, 2 CPUs) for
    /// maps of these capacities, less its fixed `struct` of each map.
    #[test]
    fn preallocated_and_socket_maps_cost_what_the_kernel_reports() {
        // LB_CONN preallocated with 2000 entries reported 354,000 bytes:
        // 160-byte elements for 2002, 2048 buckets, and its struct.
        assert_eq!((HTAB_ELEM + 8 + CONN_RECORD) * 2002 + buckets(2000), 353_088);
        // LB_SOURCES, 65,536 entries: 8,389,744.
        assert_eq!(hash(SOURCE_KEY, SOURCE_STATS, 65_536, 2), 8_388_832);
        // LB_TARGET, 67,536 entries and none used: 2,097,536; each socket
        // added 56 bytes (from the 64-byte cache).
        assert_eq!(buckets(67_536), 2_097_152);
    }

    #[test]
    fn a_connection_costs_about_three_kib() {
        let one = shape(100_000, 1).bytes();
        let two = shape(200_000, 1).bytes();
        let per_conn = (two - one) / 100_000;
        assert!((2_700..3_400).contains(&per_conn), "{per_conn} bytes per connection");
    }

    #[test]
    fn maxconn_is_the_largest_that_fits() {
        let s = shape(0, 4);
        let m = s.max_maxconn(DEFAULT_KERNEL_MEMORY, 1 << 23);
        assert!(Shape { maxconn: m, ..s }.bytes() <= DEFAULT_KERNEL_MEMORY);
        assert!(Shape { maxconn: m + 1, ..s }.bytes() > DEFAULT_KERNEL_MEMORY);
        assert!((60_000..100_000).contains(&m), "{m}");
        assert_eq!(s.max_maxconn(1 << 20, 1 << 23), 0, "1 MiB holds not even the fixed maps");
    }

    #[test]
    fn sizes_read_as_written() {
        assert_eq!(human(256 << 20), "256MiB");
        assert_eq!(human(3 << 29), "1.5GiB");
        assert_eq!(human(1000), "1000B");
    }
}
