//! The data planes: who moves bytes between a client and its server once the
//! proxy has connected them: the kernel splice ([`kernel`], with the close
//! [`watcher`]) or the userspace copy ([`userspace`]).

pub mod holder;
pub mod join;
mod joining;
mod kernel;
mod packets;
mod userspace;
mod watcher;

use std::{fmt, net::TcpStream, path::Path, sync::Arc, time::Duration};

pub use kernel::{KernelDataplane, Prepared};
use serde::{Deserialize, Serialize};
pub use userspace::UserspaceDataplane;

use crate::{
    config::{Config, DataplaneMode},
    kernel::{
        KernelError,
        object::{Objects, Spec},
    },
    observe::{conn::ConnGuard, counters::Counters},
};

/// A client and the server connected for it, ready to be spliced.
#[derive(Debug)]
pub struct Spliced {
    pub socks: Socks,
    pub guard: ConnGuard,
    /// Peer address of `client`, local and peer address of `server`
    /// (known from accept and connect; saves the data plane three syscalls).
    pub addrs: ConnAddrs,
    /// Indexes of the frontend and the backend (config order).
    pub route: [u16; 2],
    /// Bytes lb itself wrote to the server before the splice (the PROXY
    /// protocol header).
    pub header: u64,
    /// What [`Dataplane::before_connect`] prepared for the server socket.
    pub prepared: Option<Prepared>,
}

/// A server socket about to connect for a client (see
/// [`Dataplane::before_connect`]).
pub struct PreConnect<'a> {
    pub client: &'a TcpStream,
    pub server: &'a socket2::Socket,
    pub client_addr: std::net::SocketAddr,
    pub server_addr: std::net::SocketAddr,
    /// The pool address the socket is bound to (`None`: the kernel picks).
    pub source: Option<std::net::IpAddr>,
    /// Index of the client's frontend (config order).
    pub frontend: u16,
    /// Index of the server's backend (config order).
    pub backend: u16,
}

/// The two sockets of a connection, `[client, server]`. Dropped without
/// [`Socks::take`], both are reset: a connection lb gives up on must never
/// look like a clean end (FIN) to either side.
#[derive(Debug)]
pub struct Socks(Option<[TcpStream; 2]>);

impl Socks {
    pub fn new(client: TcpStream, server: TcpStream) -> Self {
        Self(Some([client, server]))
    }
    fn get(&self) -> &[TcpStream; 2] {
        self.0.as_ref().expect("sockets are only taken by value")
    }
    pub fn client(&self) -> &TcpStream {
        &self.get()[0]
    }
    pub fn server(&self) -> &TcpStream {
        &self.get()[1]
    }
    /// Hands the sockets over: from here on the caller closes them.
    pub fn take(mut self) -> [TcpStream; 2] {
        self.0.take().expect("sockets are only taken once")
    }
}

impl Drop for Socks {
    fn drop(&mut self) {
        if let Some(socks) = self.0.take() {
            for s in &socks {
                let _ = crate::kernel::sys::set_linger_zero(s);
            }
        }
    }
}

/// The three addresses of a proxied connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnAddrs {
    pub client: std::net::SocketAddr,
    pub source: std::net::SocketAddr,
    pub server: std::net::SocketAddr,
}

/// Which data plane is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Called with each server socket before its `connect()`. The kernel
    /// plane writes the connection's records here, so that the kernel can
    /// splice the server side the moment its handshake completes; dropped,
    /// the returned value removes them again (a connect that failed).
    fn before_connect(&self, _c: &PreConnect<'_>) -> Option<Prepared> {
        None
    }
    /// Takes over the connection; returns at once. On error both sockets are
    /// reset and the error says why.
    fn splice(&self, conn: Spliced) -> Result<(), SpliceError>;
    /// Closes every connection and releases kernel objects.
    fn shutdown(&self);
}

/// Why a connection could not be handed to the data plane.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("reading socket cookie: {0}")]
    Cookie(std::io::Error),
    #[error("inserting a socket: {0}")]
    MapInsert(#[from] KernelError),
    #[error("socket setup: {0}")]
    Socket(std::io::Error),
    #[error("data plane is shutting down")]
    ShuttingDown,
}

/// Loads the eBPF object for the data plane the config asks for, as the
/// process that owns it. `auto` falls back to userspace with one warning
/// that gives the reason. The userspace plane still gets the pinned stats
/// maps when the kernel allows it; `None` means no maps at all.
pub fn load(cfg: &Config) -> anyhow::Result<(Kind, Option<Objects>)> {
    let spec = |program| Spec {
        pin_path: &cfg.pin_path,
        run_dir: &cfg.runtime_dir,
        capacities: cfg.memory.capacities(),
        program,
        backends: cfg.backends.iter().map(|b| b.name.clone()).collect(),
    };
    let maps_only = |why: Option<&KernelError>| match Objects::load(spec(false)) {
        Ok(o) => Ok(Some(o)),
        Err(e @ KernelError::PinPathBusy { .. }) => Err(anyhow::anyhow!("{e}")),
        Err(e) => {
            if why.is_none() {
                log::warn!("pinned stats maps unavailable ({e}); `lb stats` cannot read this instance");
            }
            Ok(None)
        }
    };
    match cfg.dataplane {
        DataplaneMode::Userspace => Ok((Kind::Userspace, maps_only(None)?)),
        DataplaneMode::Kernel => {
            let o =
                Objects::load(spec(true)).map_err(|e| anyhow::anyhow!("dataplane = \"kernel\" cannot start: {e}"))?;
            Ok((Kind::Kernel, Some(o)))
        }
        DataplaneMode::Auto => match Objects::load(spec(true)) {
            Ok(o) => Ok((Kind::Kernel, Some(o))),
            Err(e @ KernelError::PinPathBusy { .. }) => Err(anyhow::anyhow!("{e}")),
            Err(e) => {
                log::warn!(
                    "kernel data plane unavailable ({e}); falling back to the userspace data plane \
                     (every byte is copied through lb)"
                );
                Ok((Kind::Userspace, maps_only(Some(&e))?))
            }
        },
    }
}

/// Starts this process's data plane of `kind`, on the maps pinned at
/// `pin_path` for the kernel plane, handing spliced connections to `link`
/// (`splice_queue_limit`: see [`kernel::event_shift`]); `packet`: per
/// frontend, whether it joins connections on the packet plane.
#[allow(clippy::too_many_arguments)]
pub fn open(
    kind: Kind,
    pin_path: &Path,
    stats: Arc<Counters>,
    idle: Duration,
    splice_queue_limit: u64,
    worker: u16,
    link: Arc<holder::link::Link>,
    packet: Vec<bool>,
) -> anyhow::Result<Arc<dyn Dataplane>> {
    Ok(match kind {
        Kind::Userspace => Arc::new(UserspaceDataplane::new(idle)),
        Kind::Kernel => Arc::new(
            KernelDataplane::open(pin_path, stats, idle, splice_queue_limit, worker, link, packet)
                .map_err(|e| anyhow::anyhow!("opening the kernel data plane at {}: {e}", pin_path.display()))?,
        ),
    })
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
