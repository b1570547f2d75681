//! The configuration file as written: serde types with spans, before any
//! check. The `validate` module turns them into a [`super::Config`].

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::DataplaneMode;

/// A duration as written in the file: `"750ms"`, `"5s"`, `"4h"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HumanDuration {
    pub value: Duration,
    pub text: String,
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match humantime::parse_duration(&text) {
            Ok(value) => Ok(HumanDuration { value, text }),
            Err(_) => Err(serde::de::Error::invalid_value(serde::de::Unexpected::Str(&text), &"a duration")),
        }
    }
}

/// A duration key with its place in the file.
pub type DurationKey = Option<Spanned<HumanDuration>>;

/// `[timeouts]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: DurationKey,
    pub queue: DurationKey,
    pub idle: DurationKey,
    /// A worker whose heartbeat stops this long (and that has had no CPU
    /// time since) is killed and replaced.
    pub worker: DurationKey,
    /// Longest wait for a TLS ClientHello on a frontend with `sni`.
    pub client_hello: DurationKey,
}

/// `[[frontend]]`: a listening address and the backend it feeds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub backend: Spanned<String>,
    /// Connections this frontend holds at most; beyond it, accepting pauses.
    pub maxconn: Option<Spanned<u32>>,
    /// Close a client that sends nothing this long after its accept (off
    /// by default: server-first protocols wait for the server).
    #[serde(default)]
    pub first_byte_timeout: DurationKey,
    /// TLS server name (or `*.suffix`) → backend; others go to `backend`.
    pub sni: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    /// How the kernel carries this frontend's connections: `"packet"` or `"sockmap"`.
    pub splice: Option<Spanned<String>>,
}

/// One entry of `servers`: `"ip:port"` or `{ addr = "ip:port", maxconn = N }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ServerEntry {
    Addr(String),
    Table(ServerTable),
}

impl ServerEntry {
    pub fn addr(&self) -> &str {
        match self {
            Self::Addr(a) => a,
            Self::Table(t) => &t.addr,
        }
    }
    pub fn weight(&self) -> Option<u32> {
        match self {
            Self::Addr(_) => None,
            Self::Table(t) => t.weight,
        }
    }
    pub fn maxconn(&self) -> Option<u32> {
        match self {
            Self::Addr(_) => None,
            Self::Table(t) => t.maxconn,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTable {
    pub addr: String,
    pub maxconn: Option<u32>,
    pub weight: Option<u32>,
}

/// `[backend.health]`: active checks of every server of the backend.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Time between two checks of a server (default 2s).
    pub interval: DurationKey,
    /// Time one check may take (connect, and send/expect); default: the interval.
    pub timeout: DurationKey,
    /// Consecutive successes that bring a down server up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Bytes to send after connecting (escapes: \r \n \t \\ \xHH).
    pub send: Option<String>,
    /// Bytes the reply must start with.
    pub expect: Option<String>,
}

fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// `[[backend]]`: a named set of servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Spanned<String>,
    pub servers: Spanned<Vec<Spanned<ServerEntry>>>,
    /// How a server is chosen: "roundrobin" (default), "leastconn", "source".
    #[serde(default)]
    pub balance: super::Algorithm,
    /// Active health checks; none: every server counts as up.
    pub health: Option<Spanned<Health>>,
    /// Source addresses for connections to these servers (overrides the global pool).
    pub source_pool: Option<Spanned<Vec<Spanned<String>>>>,
    /// Local port range for those connections (`"20000-60999"`).
    pub source_port_range: Option<Spanned<String>>,
    /// Default `maxconn` of every server of this backend.
    pub server_maxconn: Option<Spanned<u32>>,
    /// Clients that may wait for a server slot at once; more are reset.
    pub queue: Option<Spanned<u32>>,
    /// PROXY protocol header to the servers: "v1" or "v2" (default none).
    pub send_proxy: Option<super::SendProxy>,
}

/// `[guard]`: the XDP guard.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    pub syn_rate: Option<Spanned<u64>>,
    pub syn_burst: Option<Spanned<u64>>,
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dataplane: DataplaneMode,
    pub pin_path: Option<PathBuf>,
    /// The instance's lock, metadata and default control socket (default:
    /// systemd's `RUNTIME_DIRECTORY`, else /run/lb).
    pub runtime_dir: Option<Spanned<PathBuf>>,
    /// The runtime API's Unix socket (default: /run/lb/<pin_path mangled>.sock).
    pub control_socket: Option<PathBuf>,
    /// One log line per closed connection (target `lb::access`).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Prometheus text endpoint, `ip:port` (path /metrics).
    pub metrics_listen: Option<Spanned<String>>,
    /// Worker processes (each with its own SO_REUSEPORT listeners).
    pub workers: Option<Spanned<u32>>,
    /// Connections lb holds at most, over all workers.
    pub maxconn: Option<Spanned<u32>>,
    /// How many servers to try for one client before giving up.
    pub connect_attempts: Option<Spanned<u32>>,
    /// Send buffer of each socket ("8MiB"; "0": the kernel's autotuning).
    pub send_buffer: Option<Spanned<String>>,
    /// Kernel memory lb's eBPF maps may take at their capacities ("256MiB").
    pub kernel_memory: Option<Spanned<String>>,
    /// Bytes the kernel plane may queue for one direction of a connection
    /// before it resets the connection ("0": no limit; default: a quarter
    /// of `kernel_memory`).
    pub splice_queue_limit: Option<Spanned<String>>,
    /// Default `splice` of every frontend: `"packet"` or `"sockmap"`.
    pub splice: Option<Spanned<String>>,
    /// Default source pool of every backend.
    pub source_pool: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default local port range of the default pool.
    pub source_port_range: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The XDP guard (default: none).
    pub guard: Option<Spanned<Guard>>,
    #[serde(default)]
    pub frontend: Vec<Frontend>,
    #[serde(default)]
    pub backend: Vec<Backend>,
}

fn default_true() -> bool {
    true
}
