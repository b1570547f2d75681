//! The data planes: who moves bytes between a client and its server once the
//! proxy has connected them. The only module that touches `aya`.

mod kernel;
mod userspace;
mod watcher;

use std::{fmt, net::TcpStream, sync::Arc};

pub use kernel::{KernelDataplane, KernelError, PinnedMaps};
use lb_common::stats::DataplaneCounters;
pub use userspace::UserspaceDataplane;

use crate::{
    config::{Config, DataplaneMode},
    stats::{ConnGuard, ProxyStats},
};

/// A client and the server connected for it, ready to be spliced.
#[derive(Debug)]
pub struct Spliced {
    pub client: TcpStream,
    pub server: TcpStream,
    pub guard: ConnGuard,
}

/// Which data plane is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    Userspace,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Kernel => "kernel",
            Kind::Userspace => "userspace",
        })
    }
}

/// Moves bytes both ways between the two sockets of a [`Spliced`] until both
/// directions end, forwarding half-close as `shutdown(Write)` and a reset as
/// an abortive close, then closes both sockets exactly once.
pub trait Dataplane: Send + Sync {
    fn kind(&self) -> Kind;
    /// Takes over the connection; returns at once. On error both sockets are
    /// closed and the error says why.
    fn splice(&self, conn: Spliced) -> Result<(), SpliceError>;
    /// Closes every connection and releases kernel objects.
    fn shutdown(&self);
    /// Kernel counters, where there are any.
    fn counters(&self) -> Option<DataplaneCounters>;
}

/// Why a connection could not be handed to the data plane.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("reading socket cookie: {0}")]
    Cookie(std::io::Error),
    #[error("inserting socket into {map}: {source}")]
    MapInsert { map: &'static str, source: aya::maps::MapError },
    #[error("socket setup: {0}")]
    Socket(std::io::Error),
    #[error("data plane is shutting down")]
    ShuttingDown,
}

/// Builds the data plane the config asks for. `auto` falls back to userspace
/// with one warning that gives the reason.
pub fn start(cfg: &Config, stats: Arc<ProxyStats>) -> anyhow::Result<Arc<dyn Dataplane>> {
    match cfg.dataplane {
        DataplaneMode::Userspace => Ok(Arc::new(UserspaceDataplane::new(stats))),
        DataplaneMode::Kernel => {
            let k = KernelDataplane::load(cfg, stats)
                .map_err(|e| anyhow::anyhow!("dataplane = \"kernel\" cannot start: {e}"))?;
            Ok(Arc::new(k))
        }
        DataplaneMode::Auto => match KernelDataplane::load(cfg, stats.clone()) {
            Ok(k) => Ok(Arc::new(k)),
            Err(e) => {
                log::warn!(
                    "kernel data plane unavailable ({e}); falling back to the userspace data plane \
                     (every byte is copied through lb)"
                );
                Ok(Arc::new(UserspaceDataplane::new(stats)))
            }
        },
    }
}

/// `error: cause: cause…`, for errors whose Display omits their source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
