//! Copies this process's counters into the pinned maps every 100 ms, so
//! `lb stats` and `bpftool` see them from outside, summed over workers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};
use lb_common::stats::{ServerKey, ServerStats, SourceKey, SourceStats, WorkerCounters, WorkerStats};

use super::counters::Counters;
use crate::{
    addr::ip16,
    kernel::maps::StatMaps,
    servers::{Backends, server::STATE_REMOVED},
};

/// How often counters reach the maps.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// What this worker last wrote to one map, and what to write to make the map
/// say `now`.
struct Mirror<K, V> {
    last: HashMap<K, V>,
}

impl<K, V> Default for Mirror<K, V> {
    fn default() -> Self {
        Self { last: HashMap::new() }
    }
}

/// Entries to write and keys to delete.
struct Changes<K, V> {
    put: Vec<(K, V)>,
    gone: Vec<K>,
}

impl<K: Pod + Eq + std::hash::Hash, V: Pod + PartialEq> Mirror<K, V> {
    fn changes(&self, now: &HashMap<K, V>) -> Changes<K, V> {
        Changes {
            put: now.iter().filter(|(k, v)| self.last.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect(),
            gone: self.last.keys().filter(|k| !now.contains_key(*k)).copied().collect(),
        }
    }

    /// Writes the changes; returns how many rows could not be written, and
    /// the last error (a full map: the next flush tries them again).
    fn apply(&mut self, map: &mut BpfHashMap<MapData, K, V>, c: Changes<K, V>) -> Option<(usize, MapError)> {
        let mut failed = None;
        for (k, v) in c.put {
            match map.insert(k, v, 0) {
                Ok(()) => {
                    self.last.insert(k, v);
                }
                Err(e) => failed = Some((failed.map_or(0, |(n, _)| n) + 1, e)),
            }
        }
        for k in c.gone {
            let _ = map.remove(&k);
            self.last.remove(&k);
        }
        failed
    }
}

impl<K, V> Changes<K, V> {
    fn is_empty(&self) -> bool {
        self.put.is_empty() && self.gone.is_empty()
    }
}

pub struct Publisher {
    maps: StatMaps,
    worker: u16,
    backends: Arc<Backends>,
    stats: Arc<Counters>,
    sources: Mirror<SourceKey, SourceStats>,
    servers: Mirror<ServerKey, ServerStats>,
    last_worker: Option<WorkerStats>,
    /// Last even `WorkerStats::seq` published.
    seq: u64,
    /// What earlier processes in this slot counted (counters only, no
    /// levels), added to everything published: a restarted worker's
    /// counters continue, and `/metrics` counters never go down.
    base: Base,
    /// Rows a full map refused, for a warning at most every 5 s.
    refused: super::Every,
}

#[derive(Default)]
struct Base {
    counters: WorkerCounters,
    servers: HashMap<ServerKey, ServerStats>,
    sources: HashMap<SourceKey, SourceStats>,
}

impl Publisher {
    /// Takes over what an earlier process with the same worker index left:
    /// its counters become this one's base, its levels (connections open,
    /// ports in use: those connections died with it) are dropped. Its
    /// entries stay until the first flush replaces them (or removes those
    /// of servers gone since), so that a reader never sees the slot's
    /// counters missing, which would make a total go down for a moment.
    pub fn new(maps: StatMaps, worker: u16, backends: Arc<Backends>, stats: Arc<Counters>) -> Self {
        let old = maps.worker_entries(worker);
        let sources = Mirror { last: old.sources.iter().copied().collect() };
        let servers = Mirror { last: old.servers.iter().copied().collect() };
        let last_worker = old.worker;
        let base = Base {
            counters: old.worker.map(|w| w.counters.counters_only()).unwrap_or_default(),
            servers: old
                .servers
                .into_iter()
                .map(|(k, s)| (k, ServerStats { active: 0, state: 0, weight: 0, ..s }))
                .collect(),
            sources: old.sources.into_iter().map(|(k, s)| (k, SourceStats { ports_in_use: 0, ..s })).collect(),
        };
        Self {
            maps,
            worker,
            backends,
            stats,
            sources,
            servers,
            last_worker,
            seq: 0,
            base,
            refused: super::Every::new(),
        }
    }

    /// Writes every entry that changed since the last call.
    ///
    /// A reader must never see this worker's totals from one flush next to
    /// its per-server rows from another (`lb stats` would show 30 active
    /// connections on 1 port), so the worker's `LB_WORKERS` entry works as a
    /// seqlock: its `seq` is made odd before the other maps are touched and
    /// even again, with the new totals, after them.
    pub fn flush(&mut self) {
        // What this worker has now. A removed server is shown (as
        // "removed") while its connections last; one removed and added
        // again (a reload that changed its maxconn) shares its row.
        let mut servers: HashMap<ServerKey, ServerStats> = HashMap::new();
        let mut sources: HashMap<SourceKey, SourceStats> = HashMap::new();
        let current = self.backends.all_servers();
        let retiring = self.backends.retiring_servers();
        for (s, removed) in current.iter().map(|s| (s, false)).chain(retiring.iter().map(|s| (s, true))) {
            let server_ip = ip16(s.cfg.addr.0.ip());
            let server_port = s.cfg.addr.0.port();
            let key = ServerKey { server_ip, server_port, worker: self.worker, backend: s.backend as u16, _pad: 0 };
            let row = servers.entry(key).or_insert(ServerStats {
                state: if removed { STATE_REMOVED } else { s.state() },
                weight: if removed { 0 } else { s.weight.load(Relaxed) },
                ..Default::default()
            });
            row.active += s.active.load(Relaxed);
            row.total += s.total.load(Relaxed);
            row.connect_failures += s.connect_failures.load(Relaxed);
            row.bytes_in += s.bytes_in.load(Relaxed);
            row.bytes_out += s.bytes_out.load(Relaxed);
            for p in &s.pairs {
                let key = SourceKey {
                    source_ip: p.source.map(ip16).unwrap_or_default(),
                    server_ip,
                    server_port,
                    worker: self.worker,
                    _pad: 0,
                };
                let row = sources.entry(key).or_default();
                row.ports_in_use += p.in_use.load(Relaxed);
                row.connects += p.connects.load(Relaxed);
                row.exhausted += p.exhausted.load(Relaxed);
            }
        }
        // A predecessor's rows continue where the server still is (a server
        // removed since then has no row to continue).
        for (k, b) in &self.base.servers {
            let Some(row) = servers.get_mut(k) else { continue };
            row.total += b.total;
            row.connect_failures += b.connect_failures;
            row.bytes_in += b.bytes_in;
            row.bytes_out += b.bytes_out;
        }
        for (k, b) in &self.base.sources {
            let Some(row) = sources.get_mut(k) else { continue };
            row.connects += b.connects;
            row.exhausted += b.exhausted;
        }
        // Removed servers leave the maps once their last connection ended.
        let server_changes = self.servers.changes(&servers);
        let source_changes = self.sources.changes(&sources);
        let mut counters = self.stats.snapshot();
        counters.add(&self.base.counters);
        let w = WorkerStats { pid: u64::from(std::process::id()), seq: self.seq + 2, counters };
        let key = u32::from(self.worker);
        // Nothing else changed: the new seq alone says this worker is alive
        // and its figures current (readers and the supervisor watch it).
        if server_changes.is_empty() && source_changes.is_empty() {
            self.seq += 2;
            if self.maps.workers.insert(key, w, 0).is_ok() {
                self.last_worker = Some(w);
            }
            return;
        }
        let _ = self.maps.workers.insert(key, WorkerStats { seq: self.seq + 1, ..self.last_worker.unwrap_or(w) }, 0);
        let refused = [
            (lb_common::maps::SERVERS, self.servers.apply(&mut self.maps.servers, server_changes)),
            (lb_common::maps::SOURCES, self.sources.apply(&mut self.maps.sources, source_changes)),
        ];
        for (map, r) in refused {
            if let Some((n, e)) = r
                && let Some(times) = self.refused.hit()
            {
                log::warn!(
                    "{map}: {n} row(s) of worker {} not published ({times} time(s) since the last warning): {e}; \
                     `lb stats` and /metrics miss them (a map sized for the servers at start, with room for {} more: \
                     restart lb to size it for the servers added since)",
                    self.worker,
                    crate::config::memory::RUNTIME_SERVERS
                );
            }
        }
        self.seq += 2;
        if self.maps.workers.insert(key, w, 0).is_ok() {
            self.last_worker = Some(w);
        }
    }

    /// Flushes every [`INTERVAL`] until the task is aborted.
    pub async fn run(this: Arc<Mutex<Self>>) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            this.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
    }
}
