//! What the pinned maps say, summed over workers: the report behind
//! `lb stats`, its JSON and `/metrics`, and the rows of `lb conns`. These
//! read maps with system calls (a big instance has hundreds of thousands
//! of entries): async callers run them on a blocking thread.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use lb_common::stats::{ServerStats, WorkerStats};
use serde::Serialize;

use super::counters::{self, WorkerCounters};
use crate::{
    addr::ip_of,
    kernel::{
        KernelError,
        maps::{PinnedMaps, Published},
        object::Meta,
    },
    servers::server::state_name,
};

#[derive(Clone, Debug, Serialize)]
pub struct ServerRow {
    pub backend: String,
    pub addr: SocketAddr,
    /// "up", "down" (health check), "drain", "maint" (disabled), "removed".
    pub state: String,
    pub weight: u32,
    pub active: u64,
    pub total: u64,
    /// Client -> server bytes: what the verdict redirected (live and ended
    /// connections) plus what lb copied in connections that ended. Only grows.
    pub bytes_in: u64,
    /// Server -> client bytes.
    pub bytes_out: u64,
    pub connect_failures: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceRow {
    /// Source address; `"kernel"` when no pool is configured.
    pub ip: String,
    pub server: SocketAddr,
    pub ports_in_use: u64,
    pub connects: u64,
    pub exhausted: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerRow {
    pub worker: u32,
    pub pid: u64,
    pub active: u64,
    pub accepted: u64,
    /// Publication sequence: grows by 2 every 100 ms while the worker runs.
    pub seq: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelCounters {
    pub skbs_redirected: u64,
    pub bytes_redirected: u64,
    pub peer_missing: u64,
    /// Progress reports sent to the holders (for `splice_queue_limit`), and lost.
    pub flow_events: u64,
    pub flow_events_lost: u64,
    /// Entries in LB_SPLICE (spliced sockets, two per connection).
    pub spliced_sockets: u64,
    /// Entries in LB_TARGET (redirect targets; clients from their accept on).
    pub target_entries: u64,
    /// Server sockets the `sock_ops` program spliced at `ESTABLISHED`, and
    /// sockets it could not insert (userspace did).
    pub kernel_setups: u64,
    pub kernel_setup_failures: u64,
    pub conn_entries: u64,
}

/// How full one map is.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MapRow {
    pub map: String,
    /// Entries now (`None`: this instance's metadata cannot say).
    pub entries: Option<u64>,
    pub capacity: u32,
    /// What the map takes of the kernel's memory now, as the kernel counts
    /// it (`memlock`; without the psocks of the sockets in socket maps).
    pub bytes: u64,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub dataplane: String,
    pub servers: Vec<ServerRow>,
    pub sources: Vec<SourceRow>,
    /// Every worker counter, summed over workers.
    #[serde(serialize_with = "totals")]
    pub totals: WorkerCounters,
    pub workers: Vec<WorkerRow>,
    pub counters: KernelCounters,
    /// How full the maps are that fill with connections and servers.
    pub maps: Vec<MapRow>,
    /// The XDP guard, when the instance runs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardRow>,
    /// The packet plane's program, when the instance runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<PacketRow>,
    /// The eBPF programs acting on new connections (kernel plane; `lb stats` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programs: Option<ProgramsRow>,
}

/// What the packet plane's TC program counted, and the flows it carries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PacketRow {
    /// Packets rewritten from one connection into the other, their payload bytes.
    pub rewritten: u64,
    pub bytes: u64,
    /// SACK blocks translated.
    pub sack_blocks: u64,
    /// FINs and resets held back until lb's sockets delivered what came before.
    pub deferred: u64,
    /// Joined connections that ended, and ends the program could not report.
    pub ended: u64,
    pub ends_lost: u64,
    /// SYNs that reused a flow's addresses (the flow was removed).
    pub syn_reuse: u64,
    /// Resets lb sent a live peer where its dead peer's stream ends.
    pub turned: u64,
    /// Packets sent out of an interface toward their peer (not loopback).
    pub redirected: u64,
    /// ICMP errors about joined connections translated for their peers.
    pub icmp: u64,
    /// Entries in `LB_FLOWS` (two per joined connection).
    pub flows: u64,
}

/// Which eBPF programs act on new connections.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramsRow {
    /// SHA-256 of the eBPF object they come from, as recorded by the binary
    /// that put them in place (`lb --version` names each binary's).
    pub ebpf_sha256: String,
    /// Kernel ids of the verdict attached to `LB_SPLICE` and of the program
    /// in the `sock_ops` link (`bpftool prog show id N`).
    #[serde(flatten)]
    pub running: crate::kernel::programs::Running,
}

/// The XDP guard's counters and lists.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuardRow {
    pub passed: u64,
    pub denied: u64,
    pub rate_limited: u64,
    /// Fragments other than the first, passed (also in `passed`).
    pub fragments: u64,
    /// Dropped: headers the guard does not read past.
    pub unparsed: u64,
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    /// The sources dropped most: `{source, dropped}`, most first; a source
    /// is an IPv4 address or an IPv6 /64.
    pub top: Vec<GuardTop>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GuardTop {
    pub source: String,
    pub dropped: u64,
}

fn totals<S: serde::Serializer>(t: &WorkerCounters, s: S) -> Result<S::Ok, S::Error> {
    counters::to_json(t).serialize(s)
}

/// How often [`read`] retries a snapshot that a worker's publication
/// crossed, and how long it waits in between (a flush takes microseconds).
const SNAPSHOT_TRIES: u32 = 50;
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Each worker's publication sequence (see `WorkerStats::seq`).
fn worker_seqs(workers: &[(u32, WorkerStats)]) -> Vec<(u32, u64)> {
    let mut v: Vec<_> = workers.iter().map(|(k, w)| (*k, w.seq)).collect();
    v.sort_unstable();
    v
}

/// Reads the maps pinned at `pin_path` (metadata from `run_dir`).
///
/// Per-server, per-source and per-worker figures come from one publication
/// of each worker (retried while a worker is mid-flush); the bytes the
/// verdict counted per server (`LB_SERVER_BYTES`) are added to them.
pub fn read(pin_path: &Path, run_dir: &Path) -> Result<Report, KernelError> {
    let maps = PinnedMaps::open(pin_path)?;
    let meta = Meta::read(run_dir, pin_path).unwrap_or_default();
    let mut r = read_from(&maps, &meta)?;
    if maps.kernel {
        let running = crate::kernel::programs::running(pin_path, &maps.conn.splice);
        r.programs = Some(ProgramsRow { ebpf_sha256: meta.ebpf, running });
    }
    Ok(r)
}

/// [`read`] from maps and metadata opened earlier (the metrics endpoint
/// keeps them open, so a scrape needs no descriptor but its connection's).
///
/// The cost does not grow with connections: a few batched lookups of the
/// maps workers publish into (rows per server and source, not per
/// connection), one of the per-server byte counters, and a small proc file
/// per map for how full it is. Every byte counter is the sum of two that
/// only grow (the verdict's, and what workers copied in connections that
/// ended), so it never goes down while the instance runs.
pub fn read_from(maps: &PinnedMaps, meta: &Meta) -> Result<Report, KernelError> {
    let mut r = Report { dataplane: if maps.kernel { "kernel" } else { "userspace" }.into(), ..Default::default() };
    let mut tries = 0;
    let (mut servers, rows) = loop {
        tries += 1;
        let before = worker_seqs(&maps.workers()?);
        let published = maps.published()?;
        let settled = before.iter().all(|(_, seq)| seq % 2 == 0) && worker_seqs(&published.workers) == before;
        // A worker killed mid-flush stays odd until it is restarted: give
        // the last read rather than nothing.
        if settled || tries == SNAPSHOT_TRIES {
            break read_published(published, meta, &mut r);
        }
        std::thread::sleep(SNAPSHOT_WAIT);
    };
    for (k, b) in maps.server_bytes()? {
        let addr = SocketAddr::new(ip_of(k.server_ip), k.server_port);
        if let Some(row) = servers.get_mut(&(k.backend, addr)) {
            row.bytes_in += b.bytes_in;
            row.bytes_out += b.bytes_out;
        }
    }
    r.servers = servers.into_values().collect();
    r.maps = maps
        .usages()
        .into_iter()
        .filter_map(|(map, u)| {
            let u = u?;
            let entries = match map {
                lb_common::maps::SERVERS => Some(rows.servers),
                lb_common::maps::SOURCES => Some(rows.sources),
                lb_common::maps::WORKERS => Some(rows.workers),
                _ => crate::kernel::fill::entries(&meta.fill, map, u),
            };
            Some(MapRow { map: map.to_owned(), entries, capacity: u.capacity, bytes: u.bytes })
        })
        .collect();
    let c = maps.counters()?;
    let entries = |map: &str| r.maps.iter().find(|m| m.map == map).and_then(|m| m.entries).unwrap_or(0);
    r.counters = KernelCounters {
        skbs_redirected: c.skbs_redirected,
        bytes_redirected: c.bytes_redirected,
        peer_missing: c.peer_missing,
        flow_events: c.flow_events,
        flow_events_lost: c.flow_events_lost,
        spliced_sockets: entries(lb_common::maps::SPLICE),
        target_entries: entries(lb_common::maps::TARGET),
        kernel_setups: c.kernel_setups,
        kernel_setup_failures: c.kernel_setup_failures,
        conn_entries: entries(lb_common::maps::CONN),
    };
    if maps.packet {
        let c = crate::kernel::flows::counters(&maps.pin_path).unwrap_or_default();
        let flows = crate::kernel::flows::FlowMaps::open(&maps.pin_path).map(|f| f.entries()).unwrap_or(0);
        r.packet = Some(PacketRow {
            rewritten: c.rewritten,
            bytes: c.bytes,
            sack_blocks: c.sack_blocks,
            deferred: c.deferred,
            ended: c.ended,
            ends_lost: c.ends_lost,
            syn_reuse: c.syn_reuse,
            turned: c.turned,
            redirected: c.redirected,
            icmp: c.icmp,
            flows,
        });
    }
    if let Some(g) = &maps.guard {
        let c = g.counters()?;
        let list = |l| g.list(l).iter().map(|n| n.to_string()).collect();
        r.guard = Some(GuardRow {
            passed: c.passed,
            denied: c.denied,
            rate_limited: c.rate_limited,
            fragments: c.fragments,
            unparsed: c.unparsed,
            deny: list(crate::kernel::guard::List::Deny),
            allow: list(crate::kernel::guard::List::Allow),
            top: g.top(10).into_iter().map(|(source, dropped)| GuardTop { source, dropped }).collect(),
        });
    }
    Ok(r)
}

/// Entries read from each map the workers publish into.
#[derive(Default)]
struct Rows {
    servers: u64,
    sources: u64,
    workers: u64,
}

/// What the workers publish: server rows (returned, so that the kernel's
/// bytes can be added), source rows, totals and workers (into `r`); how
/// many entries each map had.
fn read_published(p: Published, meta: &Meta, r: &mut Report) -> (BTreeMap<(u16, SocketAddr), ServerRow>, Rows) {
    let rows =
        Rows { servers: p.servers.len() as u64, sources: p.sources.len() as u64, workers: p.workers.len() as u64 };
    r.totals = WorkerCounters::default();
    r.workers.clear();
    let mut servers: BTreeMap<(u16, SocketAddr), ServerRow> = BTreeMap::new();
    for (k, v) in p.servers {
        let addr = SocketAddr::new(ip_of(k.server_ip), k.server_port);
        let backend =
            || meta.backends.get(usize::from(k.backend)).cloned().unwrap_or_else(|| format!("#{}", k.backend));
        let row = servers.entry((k.backend, addr)).or_insert_with(|| ServerRow::empty(backend(), addr, &v));
        row.active += v.active;
        row.total += v.total;
        row.bytes_in += v.bytes_in;
        row.bytes_out += v.bytes_out;
        row.connect_failures += v.connect_failures;
    }
    let mut sources: BTreeMap<(SocketAddr, [u8; 16]), SourceRow> = BTreeMap::new();
    for (k, v) in p.sources {
        let server = SocketAddr::new(ip_of(k.server_ip), k.server_port);
        let row = sources.entry((server, k.source_ip)).or_insert_with(|| SourceRow::empty(k.source_ip, server));
        (row.ports_in_use, row.connects, row.exhausted) =
            (row.ports_in_use + v.ports_in_use, row.connects + v.connects, row.exhausted + v.exhausted);
    }
    r.sources = sources.into_values().collect();
    let mut workers = p.workers;
    workers.sort_by_key(|(k, _)| *k);
    for (k, w) in workers {
        r.totals.add(&w.counters);
        r.workers.push(WorkerRow {
            worker: k,
            pid: w.pid,
            active: w.counters.active,
            accepted: w.counters.accepted,
            seq: w.seq,
        });
    }
    (servers, rows)
}

impl ServerRow {
    /// A row with the identity of `v` (state, weight) and no counts yet.
    fn empty(backend: String, addr: SocketAddr, v: &ServerStats) -> Self {
        let state = state_name(v.state).into();
        ServerRow {
            backend,
            addr,
            state,
            weight: v.weight,
            active: 0,
            total: 0,
            bytes_in: 0,
            bytes_out: 0,
            connect_failures: 0,
        }
    }
}

impl SourceRow {
    fn empty(source_ip: [u8; 16], server: SocketAddr) -> Self {
        let ip = if source_ip == [0; 16] { "kernel".into() } else { ip_of(source_ip).to_string() };
        SourceRow { ip, server, ports_in_use: 0, connects: 0, exhausted: 0 }
    }
}
