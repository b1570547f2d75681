//! The configuration: the file as written ([`raw`]), validated into
//! [`Config`] ([`validate`], [`pool`]), every error located as
//! `FILE:LINE: message` naming the key ([`error`]). What validation asks of
//! the machine (local addresses, limits) goes through [`host::Host`].

mod error;
pub mod fit;
pub mod guard;
pub mod host;
pub mod memory;
mod pool;
mod raw;
mod size;
mod splice;
mod validate;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

pub use error::{ConfigError, LoadError};
pub use guard::GuardConfig;
use serde::Deserialize;

use crate::addr::ServerAddr;

/// Which data plane moves the bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// Kernel when the eBPF programs load, otherwise userspace with a warning.
    #[default]
    Auto,
    /// eBPF sockmap splice; refuse to start without it.
    Kernel,
    /// Copy through userspace buffers.
    Userspace,
}

impl fmt::Display for DataplaneMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// `balance = "…"` of a backend.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Smooth weighted round robin (as nginx): over every cycle of
    /// sum(weights) picks each server gets exactly its weight, interleaved.
    #[default]
    Roundrobin,
    /// Fewest live connections relative to weight; ties rotate.
    Leastconn,
    /// Consistent hash (Maglev) of the client IP: a client keeps its server,
    /// and adding or removing one of N servers moves about 1/N of clients.
    Source,
}

pub use crate::proxy_protocol::SendProxy;

/// Largest `workers`.
pub const MAX_WORKERS: u32 = 64;
const _: () = assert!(lb_common::maps::MAX_WORKERS >= MAX_WORKERS);
/// Largest `maxconn` (connections; the socket maps hold two entries each).
pub const MAX_MAXCONN: u32 = 1 << 23;
/// Open files a process keeps besides two per connection (maps, logs, listeners).
pub const FD_RESERVE: u64 = 64;
/// Largest server weight.
pub const MAX_WEIGHT: u32 = 256;
/// Longest duration any key takes: longer ones are refused (timers and
/// clocks must not overflow, and nobody means a timeout of years).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// `pin_path` when the file sets none.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

/// `[timeouts]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Time allowed for one connect attempt to a server.
    pub connect: Duration,
    /// Longest a client waits for a server slot (server `maxconn`) before it is reset.
    pub queue: Duration,
    /// A spliced connection with no bytes in either direction for this long is closed.
    pub idle: Duration,
    /// A worker whose heartbeat (its stats publication, every 100 ms) has
    /// not advanced for this long, and that has had no CPU time since, is
    /// hung: killed and replaced (one still running: after five times this).
    pub worker: Duration,
    /// Longest wait for a complete TLS ClientHello on a frontend with `sni`.
    pub client_hello: Duration,
}

/// Shortest `timeouts.worker`: a few publication periods.
pub const MIN_WORKER_TIMEOUT: Duration = Duration::from_millis(500);

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            queue: Duration::from_secs(5),
            idle: Duration::from_secs(3600),
            worker: Duration::from_secs(2),
            client_hello: Duration::from_secs(5),
        }
    }
}

/// A validated frontend.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub maxconn: Option<u32>,
    /// Close a client silent this long after its accept (`None`: never).
    pub first_byte_timeout: Option<std::time::Duration>,
    /// Backends chosen by the TLS server name (`None`: no TLS inspection).
    pub sni: Option<SniRoutes>,
    /// How the kernel data plane carries this frontend's connections.
    pub splice: Splice,
}

/// `splice = "…"` of a frontend: how the kernel data plane carries its
/// connections once lb has made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Splice {
    /// Both sockets in an eBPF sockhash; the verdict moves the bytes, the
    /// holder keeps the sockets.
    #[default]
    Sockmap,
    /// The two TCP connections joined at packet level by the TC program;
    /// lb closes both sockets. Connections it cannot join stay on sockmap.
    Packet,
}

/// A frontend's `sni` table, validated: exact names, and `*.suffix`
/// patterns (any name ending in `.suffix`, the longest suffix first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SniRoutes {
    exact: std::collections::BTreeMap<String, usize>,
    /// `(".suffix", backend)`, longest first.
    suffixes: Vec<(String, usize)>,
}

impl SniRoutes {
    /// Adds a lowercase `pattern` (`a.example` or `*.b.example`).
    pub fn add(&mut self, pattern: &str, backend: usize) {
        match pattern.strip_prefix('*') {
            Some(suffix) => {
                self.suffixes.push((suffix.to_owned(), backend));
                self.suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
            }
            None => {
                self.exact.insert(pattern.to_owned(), backend);
            }
        }
    }

    /// The backend for server name `name` (lowercase), if a pattern matches.
    pub fn route(&self, name: &str) -> Option<usize> {
        self.exact.get(name).copied().or_else(|| {
            self.suffixes.iter().find(|(s, _)| name.len() > s.len() && name.ends_with(s.as_str())).map(|r| r.1)
        })
    }
}

/// A validated server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub addr: ServerAddr,
    pub maxconn: Option<u32>,
    /// Share of new connections (0: none).
    pub weight: u32,
}

/// Where connections to a backend's servers come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePool {
    /// Local addresses, each bound with `IP_BIND_ADDRESS_NO_PORT`. Empty:
    /// the kernel picks the source address.
    pub addrs: Vec<IpAddr>,
    /// `IP_LOCAL_PORT_RANGE` for these sockets.
    pub port_range: Option<(u16, u16)>,
}

/// A validated backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub name: String,
    pub servers: Vec<ServerConfig>,
    pub pool: SourcePool,
    pub queue: u32,
    pub balance: Algorithm,
    /// With a PROXY protocol v2 backend, the check's `send` starts with a
    /// v2 `LOCAL` header.
    pub health: Option<HealthCheck>,
    pub send_proxy: Option<SendProxy>,
}

/// A validated health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
}

/// A validated configuration: everything `lb run` needs, nothing unchecked.
#[derive(Clone, Debug)]
pub struct Config {
    pub dataplane: DataplaneMode,
    pub pin_path: PathBuf,
    /// Where the lock, the metadata and the default control socket live.
    pub runtime_dir: PathBuf,
    pub control_socket: PathBuf,
    pub access_log: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub workers: u32,
    /// Over all workers.
    pub maxconn: u32,
    pub connect_attempts: u32,
    /// `SO_SNDBUFFORCE` of every client and server socket, bytes (0: the
    /// kernel's autotuning).
    pub send_buffer: u32,
    /// Bytes the kernel plane lets wait in front of a destination slower
    /// than its source before it resets the connection (0: no limit).
    pub splice_queue_limit: u64,
    /// What lb's maps may take of the kernel's memory, in bytes.
    pub kernel_memory: u64,
    /// What the maps are sized from (with the final `maxconn`): their
    /// capacities and the memory they take at them.
    pub memory: memory::Shape,
    pub timeouts: Timeouts,
    pub frontends: Vec<FrontendConfig>,
    pub backends: Vec<BackendConfig>,
    /// The XDP guard, if `[guard]` is set.
    pub guard: Option<GuardConfig>,
}

impl Config {
    /// Whether a frontend asks for the packet plane.
    pub fn packet_plane(&self) -> bool {
        self.frontends.iter().any(|f| f.splice == Splice::Packet)
    }

    /// Whether every frontend asks for the packet plane (its joined
    /// connections hold no descriptor).
    pub fn packet_only(&self) -> bool {
        self.frontends.iter().all(|f| f.splice == Splice::Packet)
    }

    /// Connections one worker process may hold.
    pub fn maxconn_per_worker(&self) -> u32 {
        self.maxconn.div_ceil(self.workers)
    }

    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with(path, &Overrides::default()).map(|(c, _)| c)
    }

    /// Like [`Self::load`] with command-line overrides; also returns the text.
    pub fn load_with(path: &Path, o: &Overrides) -> Result<(Self, String), LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::Read(path.display().to_string(), e))?;
        let cfg = Self::parse_with(&path.display().to_string(), &text, o)?;
        Ok((cfg, text))
    }

    /// Parses and validates `text` on this host; `file` only labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(file, text, &Overrides::default())
    }

    /// [`Self::parse`] with command-line overrides applied before validation.
    pub fn parse_with(file: &str, text: &str, o: &Overrides) -> Result<Self, ConfigError> {
        Self::parse_on(&host::ThisHost, file, text, o)
    }

    /// [`Self::parse_with`] asking `host` about the machine.
    pub fn parse_on(host: &dyn host::Host, file: &str, text: &str, o: &Overrides) -> Result<Self, ConfigError> {
        let loc = error::Locator { file, text };
        let de =
            toml::de::Deserializer::parse(text).map_err(|e| loc.err(e.span().map_or(0, |s| s.start), e.message()))?;
        let raw: raw::RawConfig = serde_path_to_error::deserialize(de).map_err(|e| loc.toml(e))?;
        validate::validate(raw, &loc, host, o)
    }
}

/// Values given on the command line that replace the file's.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, Deserialize)]
pub struct Overrides {
    pub workers: Option<u32>,
    pub dataplane: Option<DataplaneMode>,
    /// At most this `maxconn`: what the maps of an instance taken over hold
    /// ([`fit`]; not on the command line).
    #[serde(default)]
    pub maxconn: Option<u32>,
}

/// Open files one process needs for `maxconn` connections.
pub fn fds_needed(maxconn: u32) -> u64 {
    u64::from(maxconn) * 2 + FD_RESERVE
}

/// `"PING\r\n"` escapes into bytes.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let h: Vec<u8> = it.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&h).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(hex.ok_or_else(|| format!("bad \\x escape in \"{s}\""))?);
            }
            other => return Err(format!("unknown escape \\{} in \"{s}\"", other.map(char::from).unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// The configuration `cargo xtask demo` and the tests start from.
pub const EXAMPLE: &str = include_str!("../../../tests/fixtures/valid/basic.toml");

#[cfg(test)]
mod tests;
