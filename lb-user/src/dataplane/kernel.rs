//! Kernel data plane: eBPF sockmap splice (sk_skb stream verdict).
//!
//! Per connection, four map entries (cookies `c` client, `s` server):
//! `LB_PEER[c] = server`, `LB_PEER[s] = client` (redirect targets, no program),
//! then `LB_SPLICE[c] = client`, `LB_SPLICE[s] = server` (verdict attached).
//! Peers go in first, so a socket is never spliced while its peer is missing.

use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::SkSkb,
};
use lb_common::{
    conn::ConnTraffic,
    maps::{CONN, COUNTERS, PEER, PINNED, PROG_VERDICT, SPLICE},
    stats::{COUNTERS_KEY, DataplaneCounters},
};

use super::{Dataplane, Kind, SpliceError, Spliced, UserspaceDataplane, watcher::Watcher};
use crate::{config::Config, stats::ProxyStats, sys};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the kernel data plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs is not mounted at {0} (mount it: `mount -t bpf bpf {0}`, or run `cargo xtask setup`)")]
    BpffsMissing(PathBuf),
    #[error("another lb is running with pin_path {path} (lock {lock} is held)")]
    PinPathBusy { path: PathBuf, lock: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("loading the eBPF object: {0} (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with sockmap)")]
    Load(#[from] aya::EbpfError),
    #[error("{0}")]
    Program(String),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Io { what, source }
}

/// The maps the connection path writes.
pub(super) struct ConnMaps {
    pub peer: SockHash<MapData, u64>,
    pub splice: SockHash<MapData, u64>,
    pub conn: HashMap<MapData, u64, ConnTraffic>,
}

impl ConnMaps {
    /// Bytes the verdict redirected from the socket with this cookie.
    pub fn redirected(&self, cookie: u64) -> Option<u64> {
        self.conn.get(&cookie, 0).ok().map(|t| t.bytes)
    }
    pub fn forget(&mut self, cookies: [u64; 2]) {
        for c in cookies {
            let _ = self.conn.remove(&c);
            // The kernel drops socket entries when a socket closes; removing
            // them here too keeps the maps exact even if a close is delayed.
            let _ = self.peer.remove(&c);
            let _ = self.splice.remove(&c);
        }
    }
}

/// The running kernel data plane.
pub struct KernelDataplane {
    maps: Arc<Mutex<ConnMaps>>,
    counters: PerCpuArray<MapData, DataplaneCounters>,
    watcher: Watcher,
    /// Serves connections the kernel cannot splice (a side already half-closed).
    fallback: UserspaceDataplane,
    stats: Arc<ProxyStats>,
    pin_path: PathBuf,
    /// Owns the program (and its attachment); dropped at shutdown.
    ebpf: Mutex<Option<Ebpf>>,
    _lock: fs::File,
}

fn check_bpffs(pin_path: &Path) -> Result<(), KernelError> {
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(|_| KernelError::BpffsMissing(parent.to_owned()))?;
    // SAFETY: zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st valid.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(KernelError::BpffsMissing(parent.to_owned()));
    }
    Ok(())
}

/// Takes an exclusive lock for `pin_path`, so two instances never share pins.
fn lock_pin_path(pin_path: &Path) -> Result<fs::File, KernelError> {
    let name: String =
        pin_path.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let dir = Path::new("/run/lb");
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let lock = dir.join(format!("{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io_err(format!("opening {}", lock.display())))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(KernelError::PinPathBusy { path: pin_path.to_owned(), lock });
    }
    Ok(file)
}

/// Removes lb's pins under `pin_path` and the directory if it is then empty.
fn remove_pins(pin_path: &Path) {
    for name in PINNED.iter().chain([&PROG_VERDICT]) {
        let _ = fs::remove_file(pin_path.join(name));
    }
    let _ = fs::remove_dir(pin_path);
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Program(format!("map {name} missing from the eBPF object")))?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

impl KernelDataplane {
    /// Loads and attaches the programs, pins the maps under `pin_path`.
    pub fn load(cfg: &Config, stats: Arc<ProxyStats>) -> Result<Self, KernelError> {
        let pin_path = cfg.pin_path.clone();
        check_bpffs(&pin_path)?;
        let lock = lock_pin_path(&pin_path)?;
        // We hold the lock: whatever is pinned there was left by a dead instance.
        if pin_path.exists() {
            log::warn!("removing stale pins under {} left by an earlier lb", pin_path.display());
            remove_pins(&pin_path);
        }

        let sockets = cfg.max_connections.saturating_mul(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(PEER, sockets)
            .map_max_entries(SPLICE, sockets)
            .map_max_entries(CONN, sockets)
            .load(crate::EBPF_OBJECT)?;

        fs::create_dir_all(&pin_path).map_err(io_err(format!("creating {}", pin_path.display())))?;
        let result = (|| {
            for name in PINNED {
                let map =
                    ebpf.map(name).ok_or(KernelError::Program(format!("map {name} missing from the eBPF object")))?;
                let path = pin_path.join(name);
                map.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
            }
            let peer: SockHash<MapData, u64> = take(&mut ebpf, PEER)?;
            let splice: SockHash<MapData, u64> = take(&mut ebpf, SPLICE)?;
            let conn: HashMap<MapData, u64, ConnTraffic> = take(&mut ebpf, CONN)?;
            let counters: PerCpuArray<MapData, DataplaneCounters> = take(&mut ebpf, COUNTERS)?;

            let prog: &mut SkSkb = ebpf
                .program_mut(PROG_VERDICT)
                .ok_or(KernelError::Program(format!("program {PROG_VERDICT} missing from the eBPF object")))?
                .try_into()
                .map_err(|e| KernelError::Program(format!("program {PROG_VERDICT}: {e}")))?;
            prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_VERDICT}: {e}")))?;
            prog.attach(splice.fd())
                .map_err(|e| KernelError::Program(format!("attaching {PROG_VERDICT} to {SPLICE}: {e}")))?;
            let path = pin_path.join(PROG_VERDICT);
            prog.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
            Ok((peer, splice, conn, counters))
        })();
        let (peer, splice, conn, counters) = match result {
            Ok(v) => v,
            Err(e) => {
                drop(ebpf);
                remove_pins(&pin_path);
                return Err(e);
            }
        };
        let maps = Arc::new(Mutex::new(ConnMaps { peer, splice, conn }));
        let watcher =
            Watcher::start(maps.clone(), stats.clone()).map_err(io_err("starting the close watcher thread"))?;
        Ok(Self {
            maps,
            counters,
            watcher,
            fallback: UserspaceDataplane::new(stats.clone()),
            stats,
            pin_path,
            ebpf: Mutex::new(Some(ebpf)),
            _lock: lock,
        })
    }

    /// Inserts the four map entries. On error, everything inserted is
    /// removed again, and the flag says whether the verdict may already have
    /// moved bytes (an `LB_SPLICE` insert had succeeded).
    fn insert(&self, s: &Spliced, cookies: [u64; 2]) -> Result<(), (SpliceError, bool)> {
        let [cc, sc] = cookies;
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let mut spliced = false;
        let r = (|| {
            let ins = |map: &'static str| move |source| SpliceError::MapInsert { map, source };
            m.conn.insert(cc, ConnTraffic::default(), 0).map_err(ins(CONN))?;
            m.conn.insert(sc, ConnTraffic::default(), 0).map_err(ins(CONN))?;
            m.peer.insert(cc, s.server.as_raw_fd(), 0).map_err(ins(PEER))?;
            m.peer.insert(sc, s.client.as_raw_fd(), 0).map_err(ins(PEER))?;
            m.splice.insert(cc, s.client.as_raw_fd(), 0).map_err(ins(SPLICE))?;
            spliced = true;
            m.splice.insert(sc, s.server.as_raw_fd(), 0).map_err(ins(SPLICE))?;
            Ok(())
        })();
        if let Err(e) = r {
            m.forget(cookies);
            return Err((e, spliced));
        }
        Ok(())
    }

    /// Hands a connection the kernel cannot take to the userspace copy.
    fn fall_back(&self, conn: Spliced, why: &str) -> Result<(), SpliceError> {
        log::debug!("connection served by the userspace copy: {why}");
        self.stats.userspace_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.fallback.splice(conn)
    }
}

impl Dataplane for KernelDataplane {
    fn kind(&self) -> Kind {
        Kind::Kernel
    }

    fn splice(&self, conn: Spliced) -> Result<(), SpliceError> {
        let cookies = [
            sys::socket_cookie(&conn.client).map_err(SpliceError::Cookie)?,
            sys::socket_cookie(&conn.server).map_err(SpliceError::Cookie)?,
        ];
        let mut written_base = [0; 2];
        for (base, s) in written_base.iter_mut().zip([&conn.client, &conn.server]) {
            *base = sys::tcp_bytes_written(s).map_err(SpliceError::Socket)?;
        }
        // sockmap takes only ESTABLISHED sockets: a client that already sent
        // its FIN (CLOSE_WAIT) is served by the userspace copy instead.
        if !sys::tcp_established(&conn.client) || !sys::tcp_established(&conn.server) {
            return self.fall_back(conn, "a side closed before the splice");
        }
        match self.insert(&conn, cookies) {
            Ok(()) => {}
            Err((e, false)) => return self.fall_back(conn, &e.to_string()),
            Err((e, true)) => return Err(e),
        }
        // Bytes that arrived before the sockets were spliced sit in their
        // receive queues; re-arming data-ready runs them through the verdict.
        for s in [&conn.client, &conn.server] {
            if let Err(e) = sys::set_rcvlowat(s, 1) {
                self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
                return Err(SpliceError::Socket(e));
            }
        }
        self.watcher.watch(conn, cookies, written_base).inspect_err(|_| {
            self.maps.lock().unwrap_or_else(|e| e.into_inner()).forget(cookies);
        })
    }

    fn shutdown(&self) {
        self.watcher.stop();
        self.fallback.shutdown();
        if let Some(ebpf) = self.ebpf.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(ebpf); // detaches and unloads the program
        }
        remove_pins(&self.pin_path);
    }

    fn counters(&self) -> Option<DataplaneCounters> {
        sum_counters(&self.counters).ok()
    }
}

fn sum_counters(map: &PerCpuArray<MapData, DataplaneCounters>) -> Result<DataplaneCounters, MapError> {
    let per_cpu = map.get(&COUNTERS_KEY, 0)?;
    Ok(per_cpu.iter().fold(DataplaneCounters::default(), |acc, c| acc.add(c)))
}

/// Read-only view of a running instance's pinned maps (for `lb stats`).
pub struct PinnedMaps {
    counters: PerCpuArray<MapData, DataplaneCounters>,
    peer: SockHash<MapData, u64>,
    splice: SockHash<MapData, u64>,
    conn: HashMap<MapData, u64, ConnTraffic>,
}

/// Counts read from pinned maps.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PinnedSnapshot {
    pub counters: DataplaneCountersJson,
    /// Entries in LB_SPLICE (spliced sockets, two per connection).
    pub spliced_sockets: u64,
    /// Entries in LB_PEER.
    pub peer_entries: u64,
    /// Entries in LB_CONN.
    pub conn_entries: u64,
}

/// JSON form of [`DataplaneCounters`].
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DataplaneCountersJson {
    pub skbs_redirected: u64,
    pub bytes_redirected: u64,
    pub peer_missing: u64,
}

impl From<DataplaneCounters> for DataplaneCountersJson {
    fn from(c: DataplaneCounters) -> Self {
        Self { skbs_redirected: c.skbs_redirected, bytes_redirected: c.bytes_redirected, peer_missing: c.peer_missing }
    }
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(
            dir: &Path,
            name: &'static str,
        ) -> Result<T, KernelError> {
            let data = MapData::from_pin(dir.join(name)).map_err(|source| KernelError::Map { name, source })?;
            let map = aya::maps::Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })?;
            T::try_from(map).map_err(|source| KernelError::Map { name, source })
        }
        Ok(Self {
            counters: open(pin_path, COUNTERS)?,
            peer: open(pin_path, PEER)?,
            splice: open(pin_path, SPLICE)?,
            conn: open(pin_path, CONN)?,
        })
    }

    pub fn snapshot(&self) -> Result<PinnedSnapshot, KernelError> {
        let counters = sum_counters(&self.counters).map_err(|source| KernelError::Map { name: COUNTERS, source })?;
        Ok(PinnedSnapshot {
            counters: counters.into(),
            spliced_sockets: self.splice.keys().filter(Result::is_ok).count() as u64,
            peer_entries: self.peer.keys().filter(Result::is_ok).count() as u64,
            conn_entries: self.conn.keys().filter(Result::is_ok).count() as u64,
        })
    }
}
