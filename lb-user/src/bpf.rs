//! The eBPF object and its pinned maps.
//!
//! One process owns the object ([`Objects`]): it takes the pin-path lock,
//! loads the maps (and, for the kernel data plane, the verdict program),
//! pins them under `pin_path` and removes the pins when it stops. Every
//! process that serves connections, the owner itself and each worker, opens
//! the pins ([`Maps`]), so all of them share the same maps.

use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::SkSkb,
};
use lb_common::{
    conn::ConnTraffic,
    maps::{
        CONN, COUNTERS, MAX_SERVER_ENTRIES, MAX_SOURCE_ENTRIES, MAX_WORKERS, PEER, PINNED, PROG_VERDICT, SERVERS,
        SOURCES, SPLICE, WORKERS,
    },
    pool::{ServerKey, ServerStats, SourceKey, SourceStats, WorkerStats},
    stats::{COUNTERS_KEY, DataplaneCounters},
};

use crate::config::Config;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the eBPF object or its pins are not available.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs is not mounted at {0} (mount it: `mount -t bpf bpf {0}`, or run `cargo xtask setup`)")]
    BpffsMissing(PathBuf),
    #[error("another lb is running with pin_path {path} (lock {lock} is held); stop it or choose another pin_path")]
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
/// `/run/lb/<pin path with every non-alphanumeric as _>.<ext>`: the files an
/// instance keeps next to its pins (bpffs holds only pins): `lock`, `json`
/// (its [`crate::report::Meta`]) and `sock` (its control socket).
pub fn run_file(pin_path: &Path, ext: &str) -> PathBuf {
    let name: String =
        pin_path.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    Path::new("/run/lb").join(format!("{name}.{ext}"))
}

/// `/run/lb/<pin path, mangled>.lock`.
pub fn lock_path(pin_path: &Path) -> PathBuf {
    run_file(pin_path, "lock")
}

fn lock_pin_path(pin_path: &Path) -> Result<fs::File, KernelError> {
    let lock = lock_path(pin_path);
    let dir = lock.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
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

/// The loaded object, owned by one process.
pub struct Objects {
    pin_path: PathBuf,
    /// Owns the program (and its attachment) and the maps.
    ebpf: Option<Ebpf>,
    _lock: fs::File,
}

impl Objects {
    /// Loads the maps, and with `program` the verdict attached to `LB_SPLICE`;
    /// pins everything under the config's `pin_path`.
    pub fn load(cfg: &Config, program: bool) -> Result<Self, KernelError> {
        let pin_path = cfg.pin_path.clone();
        check_bpffs(&pin_path)?;
        let lock = lock_pin_path(&pin_path)?;
        // We hold the lock: whatever is pinned there was left by a dead instance.
        if pin_path.exists() {
            log::warn!(
                "removing stale pins under {} left by an earlier lb that did not stop cleanly",
                pin_path.display()
            );
            remove_pins(&pin_path);
        }
        let sockets = cfg.maxconn.saturating_mul(2);
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
            if !program {
                return Ok(());
            }
            let splice: SockHash<MapData, u64> = open(&pin_path, SPLICE)?;
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
            Ok(())
        })();
        if let Err(e) = result {
            drop(ebpf);
            remove_pins(&pin_path);
            return Err(e);
        }
        let meta = crate::report::Meta {
            pid: std::process::id(),
            dataplane: if program { "kernel" } else { "userspace" }.into(),
            backends: cfg.backends.iter().map(|b| b.name.clone()).collect(),
        };
        if let Err(e) = fs::write(crate::report::meta_path(&pin_path), serde_json::to_vec(&meta).unwrap_or_default()) {
            log::warn!(
                "writing {}: {e} (`lb stats` will show backend numbers, not names)",
                crate::report::meta_path(&pin_path).display()
            );
        }
        Ok(Self { pin_path, ebpf: Some(ebpf), _lock: lock })
    }

    /// Detaches and unloads the program and removes the pins.
    pub fn close(&mut self) {
        if let Some(ebpf) = self.ebpf.take() {
            drop(ebpf);
            remove_pins(&self.pin_path);
            let _ = fs::remove_file(crate::report::meta_path(&self.pin_path));
            // Still held by us, so nobody waits on it; the next start makes a new one.
            let _ = fs::remove_file(lock_path(&self.pin_path));
        }
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        self.close();
    }
}

fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, KernelError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|source| KernelError::Map { name, source })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// The maps the connection path writes (kernel data plane).
pub struct ConnMaps {
    pub peer: SockHash<MapData, u64>,
    pub splice: SockHash<MapData, u64>,
    pub conn: HashMap<MapData, u64, ConnTraffic>,
}

impl ConnMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self { peer: open(pin_path, PEER)?, splice: open(pin_path, SPLICE)?, conn: open(pin_path, CONN)? })
    }
    /// The record of the socket with this cookie.
    pub fn record(&self, cookie: u64) -> Option<ConnTraffic> {
        self.conn.get(&cookie, 0).ok()
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
            let _ = self.peer.remove(&c);
            let _ = self.splice.remove(&c);
        }
    }
    /// Removes the records of a connection about to be closed. Its socket
    /// entries need no syscall: the kernel drops a socket from every
    /// sockhash when it closes.
    pub fn forget_closing(&mut self, cookies: [u64; 2]) {
        for c in cookies {
            let _ = self.conn.remove(&c);
        }
    }
    /// Deletes the records of a worker whose process is gone (its sockets
    /// closed with it, so the kernel already removed their socket entries).
    pub fn forget_worker(&mut self, worker: u16) -> usize {
        let stale: Vec<u64> =
            self.conn.iter().filter_map(Result::ok).filter(|(_, r)| r.worker == worker).map(|(k, _)| k).collect();
        for k in &stale {
            let _ = self.conn.remove(k);
        }
        stale.len()
    }
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

    /// Removes every entry of `worker` (a restarted worker starts from zero).
    pub fn clear_worker(&mut self, worker: u16) {
        let keys: Vec<SourceKey> = self.sources.keys().filter_map(Result::ok).filter(|k| k.worker == worker).collect();
        for k in keys {
            let _ = self.sources.remove(&k);
        }
        let keys: Vec<ServerKey> = self.servers.keys().filter_map(Result::ok).filter(|k| k.worker == worker).collect();
        for k in keys {
            let _ = self.servers.remove(&k);
        }
        let _ = self.workers.remove(&u32::from(worker));
    }
}

const _: () = assert!(MAX_WORKERS as usize >= crate::config::MAX_WORKERS as usize);
const _: () = assert!(MAX_SOURCE_ENTRIES > 0 && MAX_SERVER_ENTRIES > 0);

/// Sums the per-CPU slots of `LB_COUNTERS`.
pub fn sum_counters(map: &PerCpuArray<MapData, DataplaneCounters>) -> Result<DataplaneCounters, MapError> {
    let per_cpu = map.get(&COUNTERS_KEY, 0)?;
    Ok(per_cpu.iter().fold(DataplaneCounters::default(), |acc, c| acc.add(c)))
}

/// Every pinned map, read-only use (for `lb stats`).
pub struct PinnedMaps {
    pub kernel: bool,
    pub counters: PerCpuArray<MapData, DataplaneCounters>,
    pub conn: ConnMaps,
    pub stats: StatMaps,
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            kernel: pin_path.join(PROG_VERDICT).exists(),
            counters: open(pin_path, COUNTERS)?,
            conn: ConnMaps::open(pin_path)?,
            stats: StatMaps::open(pin_path)?,
        })
    }
    pub fn counters(&self) -> Result<DataplaneCounters, KernelError> {
        sum_counters(&self.counters).map_err(|source| KernelError::Map { name: COUNTERS, source })
    }
}
