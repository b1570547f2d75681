//! `lb stats`: what the pinned maps say, summed over workers.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use lb_common::conn::SIDE_CLIENT;
use serde::{Deserialize, Serialize};

use crate::bpf::{KernelError, PinnedMaps};

/// What the owner of the maps records next to them (bpffs holds only pins).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub pid: u32,
    pub dataplane: String,
    /// Backend names by index (`LB_SERVERS` keys carry the index).
    pub backends: Vec<String>,
}

/// Where [`Meta`] of the instance pinned at `pin_path` lives.
pub fn meta_path(pin_path: &Path) -> std::path::PathBuf {
    crate::bpf::run_file(pin_path, "json")
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerRow {
    pub backend: String,
    pub addr: SocketAddr,
    /// "up", "down" (health check), "drain", "maint" (disabled).
    pub state: String,
    pub weight: u32,
    pub active: u64,
    pub total: u64,
    /// Client -> server bytes (ended connections plus live kernel-spliced ones).
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
pub struct Totals {
    pub active: u64,
    pub total: u64,
    pub rejected: u64,
    pub no_source_port: u64,
    pub queue_rejected: u64,
    pub no_server_up: u64,
    pub queued: u64,
    pub connect_failures: u64,
    pub idle_closed: u64,
    pub userspace_fallbacks: u64,
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
    /// Entries in LB_SPLICE (spliced sockets, two per connection).
    pub spliced_sockets: u64,
    pub peer_entries: u64,
    pub conn_entries: u64,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub dataplane: String,
    pub servers: Vec<ServerRow>,
    pub sources: Vec<SourceRow>,
    pub totals: Totals,
    pub workers: Vec<WorkerRow>,
    pub counters: KernelCounters,
}

fn ip_of(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// How often [`read`] retries a snapshot that a worker's publication
/// crossed, and how long it waits in between (a flush takes microseconds).
const SNAPSHOT_TRIES: u32 = 50;
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Each worker's publication sequence (see `WorkerStats::seq`).
fn worker_seqs(maps: &PinnedMaps) -> Vec<(u32, u64)> {
    let mut v: Vec<_> = maps.stats.workers.iter().filter_map(Result::ok).map(|(k, w)| (k, w.seq)).collect();
    v.sort_unstable();
    v
}

/// Reads the maps pinned at `pin_path`.
///
/// Per-server, per-source and per-worker figures come from one publication
/// of each worker (retried while a worker is mid-flush); the bytes of live
/// kernel-spliced connections are added from `LB_CONN` afterwards.
pub fn read(pin_path: &Path) -> Result<Report, KernelError> {
    let maps = PinnedMaps::open(pin_path)?;
    let meta: Meta =
        std::fs::read(meta_path(pin_path)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut r = Report { dataplane: if maps.kernel { "kernel" } else { "userspace" }.into(), ..Default::default() };

    let mut tries = 0;
    let mut servers = loop {
        tries += 1;
        let before = worker_seqs(&maps);
        let servers = read_published(&maps, &meta, &mut r);
        let settled = before.iter().all(|(_, seq)| seq % 2 == 0) && worker_seqs(&maps) == before;
        // A worker killed mid-flush stays odd until it is restarted: give
        // the last read rather than nothing.
        if settled || tries == SNAPSHOT_TRIES {
            break servers;
        }
        std::thread::sleep(SNAPSHOT_WAIT);
    };
    // Live kernel-spliced connections: their bytes are still in LB_CONN.
    let mut conn_entries = 0;
    for (_, c) in maps.conn.conn.iter().filter_map(Result::ok) {
        conn_entries += 1;
        let addr = SocketAddr::new(ip_of(c.server_ip), c.server_port);
        if let Some(row) = servers.values_mut().find(|s| s.addr == addr) {
            if c.side == SIDE_CLIENT {
                row.bytes_in += c.bytes;
            } else {
                row.bytes_out += c.bytes;
            }
        }
    }
    r.servers = servers.into_values().collect();

    let c = maps.counters()?;
    r.counters = KernelCounters {
        skbs_redirected: c.skbs_redirected,
        bytes_redirected: c.bytes_redirected,
        peer_missing: c.peer_missing,
        spliced_sockets: maps.conn.splice.keys().filter(Result::is_ok).count() as u64,
        peer_entries: maps.conn.peer.keys().filter(Result::is_ok).count() as u64,
        conn_entries,
    };
    Ok(r)
}

/// What the workers publish: server rows (returned, so that live bytes can
/// be added), source rows, totals and workers (into `r`).
fn read_published(maps: &PinnedMaps, meta: &Meta, r: &mut Report) -> BTreeMap<(u16, SocketAddr), ServerRow> {
    r.totals = Totals::default();
    r.workers.clear();
    let mut servers: BTreeMap<(u16, SocketAddr), ServerRow> = BTreeMap::new();
    for (k, v) in maps.stats.servers.iter().filter_map(Result::ok) {
        let addr = SocketAddr::new(ip_of(k.server_ip), k.server_port);
        let row = servers.entry((k.backend, addr)).or_insert_with(|| ServerRow {
            backend: meta.backends.get(usize::from(k.backend)).cloned().unwrap_or_else(|| format!("#{}", k.backend)),
            addr,
            state: crate::stats::state_name(v.state).into(),
            weight: v.weight,
            active: 0,
            total: 0,
            bytes_in: 0,
            bytes_out: 0,
            connect_failures: 0,
        });
        row.active += v.active;
        row.total += v.total;
        row.bytes_in += v.bytes_in;
        row.bytes_out += v.bytes_out;
        row.connect_failures += v.connect_failures;
    }
    let mut sources: BTreeMap<(SocketAddr, [u8; 16]), SourceRow> = BTreeMap::new();
    for (k, v) in maps.stats.sources.iter().filter_map(Result::ok) {
        let server = SocketAddr::new(ip_of(k.server_ip), k.server_port);
        let row = sources.entry((server, k.source_ip)).or_insert_with(|| SourceRow {
            ip: if k.source_ip == [0; 16] { "kernel".into() } else { ip_of(k.source_ip).to_string() },
            server,
            ports_in_use: 0,
            connects: 0,
            exhausted: 0,
        });
        row.ports_in_use += v.ports_in_use;
        row.connects += v.connects;
        row.exhausted += v.exhausted;
    }
    r.sources = sources.into_values().collect();

    let mut workers: Vec<_> = maps.stats.workers.iter().filter_map(Result::ok).collect();
    workers.sort_by_key(|(k, _)| *k);
    for (k, w) in workers {
        let t = &mut r.totals;
        t.active += w.active;
        t.total += w.accepted;
        t.rejected += w.rejected;
        t.no_source_port += w.no_source_port;
        t.queue_rejected += w.queue_rejected;
        t.no_server_up += w.no_server_up;
        t.queued += w.queued;
        t.connect_failures += w.connect_failures;
        t.idle_closed += w.idle_closed;
        t.userspace_fallbacks += w.userspace_fallbacks;
        r.workers.push(WorkerRow { worker: k, pid: w.pid, active: w.active, accepted: w.accepted, seq: w.seq });
    }
    servers
}

/// The human form: aligned tables.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let t = &r.totals;
    let _ = writeln!(o, "data plane {}   workers {}", r.dataplane, r.workers.len());
    let _ = writeln!(
        o,
        "active {}   total {}   rejected {} (no source port {}, queue {}, no server up {})   queued {}   idle closed {}",
        t.active, t.total, t.rejected, t.no_source_port, t.queue_rejected, t.no_server_up, t.queued, t.idle_closed
    );
    // One format per table, for its header and its rows alike. STATE fits "removed".
    macro_rules! server_line {
        ($($col:expr),*) => { writeln!(o, "{:<16} {:<40} {:<7} {:>6} {:>8} {:>10} {:>16} {:>16} {:>8}", $($col),*) };
    }
    macro_rules! source_line {
        ($($col:expr),*) => { writeln!(o, "{:<40} {:<40} {:>12} {:>10} {:>10}", $($col),*) };
    }
    let _ = writeln!(o);
    let _ = server_line!("BACKEND", "SERVER", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "BYTES_IN", "BYTES_OUT", "FAILS");
    for s in &r.servers {
        let _ = server_line!(
            s.backend,
            s.addr.to_string(),
            s.state,
            s.weight,
            s.active,
            s.total,
            s.bytes_in,
            s.bytes_out,
            s.connect_failures
        );
    }
    let _ = writeln!(o);
    let _ = source_line!("SOURCE", "SERVER", "PORTS_IN_USE", "CONNECTS", "EXHAUSTED");
    for s in &r.sources {
        let _ = source_line!(s.ip, s.server.to_string(), s.ports_in_use, s.connects, s.exhausted);
    }
    if r.dataplane == "kernel" {
        let c = &r.counters;
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "kernel: {} bytes in {} skbs redirected, {} spliced sockets, {} peer misses",
            c.bytes_redirected, c.skbs_redirected, c.spliced_sockets, c.peer_missing
        );
    }
    o
}

/// One spliced connection, from its two `LB_CONN` records.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRow {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The local address lb connected from.
    pub source: SocketAddr,
    pub worker: u16,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Live kernel-spliced connections, optionally only those to `server`.
pub fn conns(pin_path: &Path, server: Option<SocketAddr>) -> Result<Vec<ConnRow>, KernelError> {
    let maps = PinnedMaps::open(pin_path)?;
    let now = crate::sys::monotonic_coarse_ns();
    let all: std::collections::HashMap<u64, lb_common::conn::ConnTraffic> =
        maps.conn.conn.iter().filter_map(Result::ok).collect();
    let mut rows: Vec<ConnRow> = all
        .values()
        .filter(|c| c.side == SIDE_CLIENT)
        .map(|c| {
            let peer = all.get(&c.peer_cookie);
            let last = c.last_active_ns.max(peer.map_or(0, |p| p.last_active_ns));
            ConnRow {
                client: SocketAddr::new(ip_of(c.client_ip), c.client_port),
                server: SocketAddr::new(ip_of(c.server_ip), c.server_port),
                source: SocketAddr::new(ip_of(c.source_ip), c.source_port),
                worker: c.worker,
                age_secs: now.saturating_sub(c.start_ns) as f64 / 1e9,
                idle_secs: now.saturating_sub(last) as f64 / 1e9,
                bytes_in: c.bytes,
                bytes_out: peer.map_or(0, |p| p.bytes),
            }
        })
        .filter(|r| server.is_none_or(|s| s == r.server))
        .collect();
    rows.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
    Ok(rows)
}

/// `lb conns` as an aligned table.
pub fn render_conns(rows: &[ConnRow]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<42} {:<42} {:<42} {:>6} {:>10} {:>10} {:>14} {:>14}",
        "CLIENT", "SERVER", "SOURCE", "WORKER", "AGE_S", "IDLE_S", "BYTES_IN", "BYTES_OUT"
    );
    for r in rows {
        let _ = writeln!(
            o,
            "{:<42} {:<42} {:<42} {:>6} {:>10.1} {:>10.1} {:>14} {:>14}",
            r.client.to_string(),
            r.server.to_string(),
            r.source.to_string(),
            r.worker,
            r.age_secs,
            r.idle_secs,
            r.bytes_in,
            r.bytes_out
        );
    }
    let _ = writeln!(o, "{} connection(s)", rows.len());
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_table_stays_aligned_for_every_state() {
        let row = |state: &str| ServerRow {
            backend: "app".into(),
            addr: "127.0.0.1:9001".parse().unwrap(),
            state: state.into(),
            weight: 1,
            active: 2,
            total: 3,
            bytes_in: 4,
            bytes_out: 5,
            connect_failures: 0,
        };
        let r = Report {
            dataplane: "userspace".into(),
            servers: ["up", "down", "drain", "maint", "removed"].map(row).to_vec(),
            ..Default::default()
        };
        let text = render(&r);
        let table: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("BACKEND")).take(6).collect();
        assert_eq!(table.len(), 6, "{text}");
        // WEIGHT is right-aligned: every line ends that column at the same place.
        let end = table[0].find("WEIGHT").unwrap() + "WEIGHT".len();
        for l in &table[1..] {
            assert_eq!(&l[end - 1..end], "1", "misaligned row:\n{text}");
            assert_eq!(&l[end..end + 1], " ", "misaligned row:\n{text}");
        }
    }
}
