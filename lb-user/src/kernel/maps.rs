//! Typed handles to the pinned maps, opened by every process that serves
//! or reads (workers, the supervisor, `lb stats`).

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{ArrayOfMaps, HashMap, IterableMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, SockHash};
use lb_common::{
    conn::ConnTraffic,
    maps::{
        CONN, COUNTERS, EVENTS, EVENTS_RING_BYTES, MAX_SERVER_ENTRIES, MAX_SOURCE_ENTRIES, MAX_WORKERS, PROG_VERDICT,
        SERVER_BYTES, SERVERS, SOURCES, SPLICE, TARGET, WORKERS,
    },
    stats::{
        COUNTERS_KEY, DataplaneCounters, ServerBytes, ServerBytesKey, ServerKey, ServerStats, SourceKey, SourceStats,
        WorkerStats,
    },
};

use super::{KernelError, io_err, open};

/// The maps the connection path writes (kernel data plane).
pub struct ConnMaps {
    pub target: SockHash<MapData, u64>,
    pub splice: SockHash<MapData, u64>,
    pub conn: HashMap<MapData, u64, ConnTraffic>,
}

impl ConnMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self { target: open(pin_path, TARGET)?, splice: open(pin_path, SPLICE)?, conn: open(pin_path, CONN)? })
    }
    /// `LB_CONN`'s descriptor, for the batched calls aya does not make.
    fn conn_fd(&self) -> &aya::maps::MapFd {
        aya::maps::IterableMap::map(&self.conn).fd()
    }
    /// Inserts the records of a connection's two sockets (by cookie) in one
    /// `bpf()`.
    pub fn insert_records(&mut self, cookies: [u64; 2], records: [ConnTraffic; 2]) -> Result<(), KernelError> {
        super::batch::update(self.conn_fd(), &cookies, &records)
            .map_err(|source| KernelError::Io { what: format!("map {CONN}: inserting two records"), source })
    }
    /// Makes the socket with `cookie` a redirect target: the bytes of its
    /// peer (whose record names this cookie) go to it.
    pub fn insert_target(&mut self, cookie: u64, sock: &impl AsRawFd) -> Result<(), KernelError> {
        self.target.insert(cookie, sock.as_raw_fd(), 0).map_err(|source| KernelError::Map { name: TARGET, source })
    }
    /// Splices the socket: the verdict runs on every byte it receives.
    pub fn insert_splice(&mut self, cookie: u64, sock: &impl AsRawFd) -> Result<(), KernelError> {
        self.splice.insert(cookie, sock.as_raw_fd(), 0).map_err(|source| KernelError::Map { name: SPLICE, source })
    }
    /// The record of the socket with this cookie.
    pub fn record(&self, cookie: u64) -> Option<ConnTraffic> {
        self.conn.get(&cookie, 0).ok()
    }
    /// Every record (for `lb conns`), batched.
    pub fn all_records(&self) -> Result<Vec<(u64, ConnTraffic)>, KernelError> {
        super::batch::lookup_all(self.conn_fd()).map_err(io_err(format!("reading map {CONN}")))
    }
    /// Bytes the verdict redirected from the socket with this cookie.
    pub fn redirected(&self, cookie: u64) -> Option<u64> {
        self.record(cookie).map(|t| t.bytes)
    }
    /// Removes every entry of a connection whose sockets stay open (a
    /// splice that could not be completed).
    pub fn forget(&mut self, cookies: [u64; 2]) {
        for c in cookies {
            let _ = self.conn.remove(&c);
            let _ = self.target.remove(&c);
            let _ = self.splice.remove(&c);
        }
    }
    /// Removes a connection's two records in one `bpf()` (written before a
    /// connect that failed, or for a connection given up before its splice).
    pub fn forget_records(&mut self, cookies: [u64; 2]) {
        self.forget_closing(&cookies);
    }
    /// Removes the records of connections about to be closed (by their
    /// sockets' cookies), in one `bpf()`; their socket entries need none:
    /// the kernel drops a socket from every sockhash when it closes.
    pub fn forget_closing(&mut self, cookies: &[u64]) {
        if cookies.is_empty() {
            return;
        }
        if let Err(e) = super::batch::delete(self.conn_fd(), cookies) {
            log::warn!("removing {} connection record(s): {e}", cookies.len());
        }
    }
    /// Deletes the records of worker slot `worker` whose cookies are not in
    /// `keep` (the connections its holder holds): those of connections a
    /// worker was setting up when it died (their sockets closed with it, so
    /// the kernel already removed their socket entries), or of a holder
    /// before this one. Two `bpf()` calls per few thousand records.
    pub fn forget_worker(&mut self, worker: u16, keep: &std::collections::HashSet<u64>) -> usize {
        let all = match super::batch::lookup_all::<u64, ConnTraffic>(self.conn_fd()) {
            Ok(all) => all,
            Err(e) => {
                log::warn!("reading {CONN} to remove worker {worker}'s leftover records: {e}");
                return 0;
            }
        };
        let stale: Vec<u64> =
            all.into_iter().filter(|(k, r)| r.worker == worker && !keep.contains(k)).map(|(k, _)| k).collect();
        match super::batch::delete(self.conn_fd(), &stale) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("removing worker {worker}'s {} leftover record(s): {e}", stale.len());
                0
            }
        }
    }
}

/// Makes the ring buffer through which the verdict tells the holder of
/// worker slot `slot` how its connections' directions progress, and puts it
/// in that slot of `LB_EVENTS` (replacing an earlier holder's).
pub fn events_ring(pin_path: &Path, slot: u16) -> Result<RingBuf<MapData>, KernelError> {
    let mut outer: ArrayOfMaps<MapData, MapData> = open(pin_path, EVENTS)?;
    let def = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
        0,
        0,
        EVENTS_RING_BYTES,
        0,
    );
    let ring =
        MapData::create(def, "LB_EVENTS_RING", None).map_err(|source| KernelError::Map { name: EVENTS, source })?;
    outer.set(u32::from(slot), &ring, 0).map_err(|source| KernelError::Map { name: EVENTS, source })?;
    RingBuf::try_from(aya::maps::Map::RingBuf(ring)).map_err(|source| KernelError::Map { name: EVENTS, source })
}

/// The counters userspace publishes.
pub struct StatMaps {
    pub sources: HashMap<MapData, SourceKey, SourceStats>,
    pub servers: HashMap<MapData, ServerKey, ServerStats>,
    pub workers: HashMap<MapData, u32, WorkerStats>,
}

impl StatMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            sources: open(pin_path, SOURCES)?,
            servers: open(pin_path, SERVERS)?,
            workers: open(pin_path, WORKERS)?,
        })
    }

    /// What an earlier process in `worker`'s slot published last: its
    /// worker counters and its server and source rows.
    pub fn worker_entries(&self, worker: u16) -> WorkerEntries {
        WorkerEntries {
            worker: self.workers.get(&u32::from(worker), 0).ok(),
            servers: self.servers.iter().filter_map(Result::ok).filter(|(k, _)| k.worker == worker).collect(),
            sources: self.sources.iter().filter_map(Result::ok).filter(|(k, _)| k.worker == worker).collect(),
        }
    }
}

/// The rows the workers publish, as read at once.
#[derive(Debug, Default)]
pub struct Published {
    pub servers: Vec<(ServerKey, ServerStats)>,
    pub sources: Vec<(SourceKey, SourceStats)>,
    pub workers: Vec<(u32, WorkerStats)>,
}

/// See [`StatMaps::worker_entries`].
#[derive(Debug, Default)]
pub struct WorkerEntries {
    pub worker: Option<WorkerStats>,
    pub servers: Vec<(ServerKey, ServerStats)>,
    pub sources: Vec<(SourceKey, SourceStats)>,
}

const _: () = assert!(MAX_WORKERS > 0 && MAX_SOURCE_ENTRIES > 0 && MAX_SERVER_ENTRIES > 0);

/// Every pinned map, read-only use (for `lb stats`).
pub struct PinnedMaps {
    pub pin_path: std::path::PathBuf,
    /// Whether the verdict is pinned (the kernel data plane runs).
    pub kernel: bool,
    /// Whether the packet plane's program is pinned.
    pub packet: bool,
    /// The XDP guard's maps, when its program is pinned (it runs).
    pub guard: Option<super::guard::GuardMaps>,
    pub counters: PerCpuArray<MapData, DataplaneCounters>,
    pub conn: ConnMaps,
    pub stats: StatMaps,
    pub server_bytes: PerCpuHashMap<MapData, ServerBytesKey, ServerBytes>,
    /// Possible CPUs: the per-CPU values of each entry.
    cpus: usize,
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            pin_path: pin_path.to_owned(),
            kernel: pin_path.join(PROG_VERDICT).exists(),
            packet: pin_path.join(lb_common::maps::PROG_PACKET).exists(),
            guard: if pin_path.join(lb_common::maps::PROG_GUARD).exists() {
                Some(super::guard::GuardMaps::open(pin_path)?)
            } else {
                None
            },
            counters: open(pin_path, COUNTERS)?,
            conn: ConnMaps::open(pin_path)?,
            stats: StatMaps::open(pin_path)?,
            server_bytes: open(pin_path, SERVER_BYTES)?,
            cpus: lb_common::host::possible_cpus() as usize,
        })
    }

    /// The published rows of every worker: one `BPF_MAP_LOOKUP_BATCH` per
    /// few thousand entries of each map, not two calls per entry.
    pub fn published(&self) -> Result<Published, KernelError> {
        Ok(Published {
            servers: super::batch::lookup_all(self.stats.servers.map().fd())
                .map_err(io_err(format!("reading map {SERVERS}")))?,
            sources: super::batch::lookup_all(self.stats.sources.map().fd())
                .map_err(io_err(format!("reading map {SOURCES}")))?,
            workers: self.workers()?,
        })
    }

    /// Every worker's `LB_WORKERS` entry.
    pub fn workers(&self) -> Result<Vec<(u32, WorkerStats)>, KernelError> {
        super::batch::lookup_all(self.stats.workers.map().fd()).map_err(io_err(format!("reading map {WORKERS}")))
    }

    /// The bytes the verdict redirected per server, summed over CPUs.
    pub fn server_bytes(&self) -> Result<Vec<(ServerBytesKey, ServerBytes)>, KernelError> {
        let rows =
            super::batch::lookup_all_per_cpu::<ServerBytesKey, ServerBytes>(self.server_bytes.map().fd(), self.cpus)
                .map_err(io_err(format!("reading map {SERVER_BYTES}")))?;
        Ok(rows
            .into_iter()
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(ServerBytes::default(), |a, b| ServerBytes {
                    bytes_in: a.bytes_in + b.bytes_in,
                    bytes_out: a.bytes_out + b.bytes_out,
                });
                (k, sum)
            })
            .collect())
    }

    /// The capacity and memory of the maps that fill with connections and
    /// servers (`None` for one whose fdinfo cannot be read).
    pub fn usages(&self) -> [(&'static str, Option<super::fill::Usage>); 7] {
        let u = |m: &MapData| super::fill::usage(m.fd().as_fd());
        [
            (CONN, u(self.conn.conn.map())),
            (TARGET, u(IterableMap::<u64, _>::map(&self.conn.target))),
            (SPLICE, u(IterableMap::<u64, _>::map(&self.conn.splice))),
            (SERVERS, u(self.stats.servers.map())),
            (SOURCES, u(self.stats.sources.map())),
            (SERVER_BYTES, u(self.server_bytes.map())),
            (WORKERS, u(self.stats.workers.map())),
        ]
    }

    /// The verdict's counters, summed over CPUs.
    pub fn counters(&self) -> Result<DataplaneCounters, KernelError> {
        let per_cpu =
            self.counters.get(&COUNTERS_KEY, 0).map_err(|source| KernelError::Map { name: COUNTERS, source })?;
        Ok(per_cpu.iter().fold(DataplaneCounters::default(), |acc, c| acc.add(c)))
    }
}
