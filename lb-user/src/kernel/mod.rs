//! Everything that touches the kernel beyond plain sockets: the eBPF object
//! and its pins ([`object`]), typed handles to the pinned maps ([`maps`]),
//! and the few socket options no crate wraps ([`sys`]). The only module
//! that uses `aya` or `unsafe`.

pub mod batch;
pub mod fill;
pub mod flows;
pub mod grace;
pub mod guard;
pub mod link;
pub mod lock;
pub mod maps;
pub mod meta;
pub mod object;
pub mod programs;
pub mod sys;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapError};

/// Why the eBPF object or its pins are not available.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs is not mounted at {0} (mount it: `mount -t bpf bpf {0}`, or run `cargo xtask setup`)")]
    BpffsMissing(PathBuf),
    #[error("another lb{} is running with pin_path {path} (lock {lock} is held); stop it or choose another pin_path", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    PinPathBusy { path: PathBuf, lock: PathBuf, pid: Option<u32> },
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

/// Opens the map `name` pinned under `dir`.
fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, KernelError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|source| KernelError::Map { name, source })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}
