//! Configuration file: TOML types, defaults and validation.
//!
//! `Config::load` parses and validates; every error names the file, the line
//! and the key, so `lb check` can print `FILE:LINE: message`.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::backend::ServerAddr;

/// Which data plane moves the bytes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
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

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}
fn default_connect_attempts() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_true() -> bool {
    true
}
fn default_workers() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
fn default_queue() -> Spanned<u32> {
    Spanned::new(0..0, 1024)
}

/// Largest `workers`.
pub const MAX_WORKERS: u32 = 64;
/// Largest `maxconn` (connections; the socket maps hold two entries each).
pub const MAX_MAXCONN: u32 = 1 << 23;
/// Open files a process keeps besides two per connection (maps, logs, listeners).
pub const FD_RESERVE: u64 = 64;
/// Largest number of addresses one `source_pool` CIDR may expand to.
const MAX_CIDR_ADDRS: u128 = 1 << 16;

/// Longest duration any key takes: longer ones are refused (timers and
/// clocks must not overflow, and nobody means a timeout of years).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

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

/// `[timeouts]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Spanned<HumanDuration>>,
    pub queue: Option<Spanned<HumanDuration>>,
    pub idle: Option<Spanned<HumanDuration>>,
}

/// `[timeouts]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Time allowed for one connect attempt to a server.
    pub connect: Duration,
    /// Longest a client waits for a server slot (server `maxconn`) before it is reset.
    pub queue: Duration,
    /// A spliced connection with no bytes in either direction for this long is closed.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), queue: Duration::from_secs(5), idle: Duration::from_secs(3600) }
    }
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
}

/// One entry of `servers`: `"ip:port"` or `{ addr = "ip:port", maxconn = N }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ServerEntry {
    Addr(String),
    Table(ServerTable),
}

impl ServerEntry {
    fn weight(&self) -> Option<u32> {
        match self {
            Self::Addr(_) => None,
            Self::Table(t) => t.weight,
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

/// Largest server weight.
pub const MAX_WEIGHT: u32 = 256;

fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// `[backend.health]`: active checks of every server of the backend.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between two checks of a server (default 2s).
    pub interval: Option<Spanned<HumanDuration>>,
    /// Time one check may take (connect, and send/expect); default: the interval.
    pub timeout: Option<Spanned<HumanDuration>>,
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

impl ServerEntry {
    fn addr(&self) -> &str {
        match self {
            Self::Addr(a) => a,
            Self::Table(t) => &t.addr,
        }
    }
}

/// `[[backend]]`: a named set of servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Spanned<String>,
    pub servers: Spanned<Vec<Spanned<ServerEntry>>>,
    /// How a server is chosen: "roundrobin" (default), "leastconn", "source".
    #[serde(default)]
    pub balance: crate::select::Algorithm,
    /// Active health checks; none: every server counts as up.
    pub health: Option<Spanned<HealthConfig>>,
    /// Source addresses for connections to these servers (overrides the global pool).
    pub source_pool: Option<Spanned<Vec<Spanned<String>>>>,
    /// Local port range for those connections (`"20000-60999"`).
    pub source_port_range: Option<Spanned<String>>,
    /// Default `maxconn` of every server of this backend.
    pub server_maxconn: Option<Spanned<u32>>,
    /// Clients that may wait for a server slot at once; more are closed.
    #[serde(default = "default_queue")]
    pub queue: Spanned<u32>,
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dataplane: DataplaneMode,
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// The runtime API's Unix socket (default: /run/lb/<pin_path mangled>.sock).
    pub control_socket: Option<PathBuf>,
    /// One log line per closed connection (target `lb::access`).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Prometheus text endpoint, `ip:port` (path /metrics).
    pub metrics_listen: Option<Spanned<String>>,
    /// Worker processes (each with its own SO_REUSEPORT listeners).
    #[serde(default = "default_workers")]
    pub workers: Spanned<u32>,
    /// Connections lb holds at most, over all workers.
    pub maxconn: Option<Spanned<u32>>,
    /// How many servers to try for one client before giving up.
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: Spanned<u32>,
    /// Default source pool of every backend.
    pub source_pool: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default local port range of the default pool.
    pub source_port_range: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub frontend: Vec<Frontend>,
    #[serde(default)]
    pub backend: Vec<Backend>,
}

/// A validated frontend.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub maxconn: Option<u32>,
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
    pub balance: crate::select::Algorithm,
    pub health: Option<HealthCheck>,
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

/// A validated configuration: everything `lb run` needs, nothing unchecked.
#[derive(Clone, Debug)]
pub struct Config {
    pub dataplane: DataplaneMode,
    pub pin_path: PathBuf,
    pub control_socket: PathBuf,
    pub access_log: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub workers: u32,
    /// Over all workers.
    pub maxconn: u32,
    pub connect_attempts: u32,
    pub timeouts: Timeouts,
    pub frontends: Vec<FrontendConfig>,
    pub backends: Vec<BackendConfig>,
}

impl Config {
    /// Connections one worker process may hold.
    pub fn maxconn_per_worker(&self) -> u32 {
        self.maxconn.div_ceil(self.workers)
    }
}

/// Open files one process needs for `maxconn` connections.
pub fn fds_needed(maxconn: u32) -> u64 {
    u64::from(maxconn) * 2 + FD_RESERVE
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Errors found while reading the file (before locating them).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: cannot read: {1}")]
    Read(String, std::io::Error),
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }
    fn err(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_owned(), line: self.line(offset), message: message.into() }
    }
}

impl Config {
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

    /// Parses and validates `text`; `file` only labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(file, text, &Overrides::default())
    }

    /// [`Self::parse`] with command-line overrides applied before validation.
    pub fn parse_with(file: &str, text: &str, o: &Overrides) -> Result<Self, ConfigError> {
        let loc = Locator { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let mut msg = e.message().trim_end().to_owned();
            if msg.starts_with("data did not match any variant of untagged enum ServerEntry") {
                msg =
                    "servers: each entry must be \"ip:port\" or { addr = \"ip:port\", weight = W, maxconn = N }".into();
            }
            if let Some(key) = key_at(text, offset).filter(|k| !msg.contains(k.as_str())) {
                msg.push_str(&format!(" (key {key})"));
            }
            loc.err(offset, msg)
        })?;
        let mut raw = raw;
        if let Some(w) = o.workers {
            raw.workers = Spanned::new(0..0, w);
        }
        if let Some(d) = o.dataplane {
            raw.dataplane = d;
        }
        raw.validate(&loc)
    }
}

/// Values given on the command line that replace the file's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    pub workers: Option<u32>,
    pub dataplane: Option<DataplaneMode>,
}

fn span_of<T>(s: &Spanned<T>) -> usize {
    s.span().start
}

impl RawConfig {
    fn validate(self, loc: &Locator<'_>) -> Result<Config, ConfigError> {
        if self.frontend.is_empty() {
            return Err(loc.err(0, "no [[frontend]]: at least one is needed"));
        }
        if self.backend.is_empty() {
            return Err(loc.err(0, "no [[backend]]: at least one is needed"));
        }
        let workers = *self.workers.get_ref();
        if workers == 0 || workers > MAX_WORKERS {
            return Err(
                loc.err(span_of(&self.workers), format!("workers = {workers}: must be between 1 and {MAX_WORKERS}"))
            );
        }
        let hard = crate::sys::nofile_hard_limit().unwrap_or(1 << 20);
        let fit = (hard.saturating_sub(FD_RESERVE) / 2).min(u64::from(MAX_MAXCONN)) as u32;
        let maxconn = match &self.maxconn {
            None => fit.saturating_mul(workers).min(MAX_MAXCONN),
            Some(m) => {
                let v = *m.get_ref();
                if v == 0 || v > MAX_MAXCONN {
                    return Err(loc.err(span_of(m), format!("maxconn = {v}: must be between 1 and {MAX_MAXCONN}")));
                }
                let per_worker = v.div_ceil(workers);
                if fds_needed(per_worker) > hard {
                    let need_workers = u64::from(v).div_ceil(u64::from(fit.max(1)));
                    let fix = if need_workers <= u64::from(MAX_WORKERS) {
                        format!("set workers = {need_workers} or more, lower maxconn, or raise LimitNOFILE")
                    } else {
                        "lower maxconn or raise LimitNOFILE".to_owned()
                    };
                    return Err(loc.err(
                        span_of(m),
                        format!(
                            "maxconn = {v}: {per_worker} connections per worker need {} open files, but the \
                             hard limit (ulimit -Hn) is {hard}; {fix}",
                            fds_needed(per_worker)
                        ),
                    ));
                }
                v
            }
        };
        let connect_attempts = *self.connect_attempts.get_ref();
        if connect_attempts == 0 {
            return Err(loc.err(span_of(&self.connect_attempts), "connect_attempts = 0: must be at least 1"));
        }
        let defaults = Timeouts::default();
        let t = &self.timeouts;
        let timeouts = Timeouts {
            connect: duration(loc, "timeouts.connect", &t.connect, defaults.connect)?,
            queue: duration(loc, "timeouts.queue", &t.queue, defaults.queue)?,
            idle: duration(loc, "timeouts.idle", &t.idle, defaults.idle)?,
        };

        let default_pool =
            parse_pool(loc, "source_pool", "source_port_range", &self.source_pool, &self.source_port_range)?;

        let mut backends = Vec::with_capacity(self.backend.len());
        let mut names = HashSet::new();
        for b in &self.backend {
            let name = b.name.get_ref();
            check_name(loc, &b.name, "backend.name")?;
            if !names.insert(name.as_str()) {
                return Err(loc.err(span_of(&b.name), format!("backend.name: duplicate backend \"{name}\"")));
            }
            if b.servers.get_ref().is_empty() {
                return Err(loc.err(
                    span_of(&b.servers),
                    format!("backend \"{name}\": servers is empty; list at least one \"ip:port\""),
                ));
            }
            let server_maxconn = match &b.server_maxconn {
                Some(m) if *m.get_ref() == 0 => {
                    return Err(
                        loc.err(span_of(m), format!("backend \"{name}\": server_maxconn = 0: must be at least 1"))
                    );
                }
                m => m.as_ref().map(|m| *m.get_ref()),
            };
            let mut servers: Vec<ServerConfig> = Vec::new();
            for entry in b.servers.get_ref() {
                let at = span_of(entry);
                let text = entry.get_ref().addr();
                let addr: SocketAddr = text.parse().map_err(|_| {
                    loc.err(at, format!("backend \"{name}\": servers: \"{text}\" is not an ip:port address"))
                })?;
                if addr.port() == 0 || addr.ip().is_unspecified() {
                    return Err(loc.err(
                        at,
                        format!("backend \"{name}\": servers: \"{addr}\" needs a concrete ip and a non-zero port"),
                    ));
                }
                let addr = ServerAddr(addr);
                if servers.iter().any(|x| x.addr == addr) {
                    return Err(loc.err(at, format!("backend \"{name}\": servers: \"{addr}\" is listed twice")));
                }
                let maxconn = match entry.get_ref() {
                    ServerEntry::Table(ServerTable { maxconn: Some(0), .. }) => {
                        return Err(
                            loc.err(at, format!("backend \"{name}\": server {addr}: maxconn = 0: must be at least 1"))
                        );
                    }
                    ServerEntry::Table(ServerTable { maxconn: Some(m), .. }) => Some(*m),
                    _ => server_maxconn,
                };
                let weight = entry.get_ref().weight().unwrap_or(1);
                if weight > MAX_WEIGHT {
                    return Err(loc.err(
                        at,
                        format!(
                            "backend \"{name}\": server {addr}: weight = {weight}: must be between 0 and {MAX_WEIGHT}"
                        ),
                    ));
                }
                servers.push(ServerConfig { addr, maxconn, weight });
            }
            let pool = if b.source_pool.is_some() || b.source_port_range.is_some() {
                let mut p = parse_pool(loc, "source_pool", "source_port_range", &b.source_pool, &b.source_port_range)?;
                if b.source_pool.is_none() {
                    p.addrs = default_pool.addrs.clone();
                }
                p
            } else {
                default_pool.clone()
            };
            if !pool.addrs.is_empty() {
                for s in &servers {
                    if !pool.addrs.iter().any(|a| a.is_ipv4() == s.addr.0.is_ipv4()) {
                        let at = b.source_pool.as_ref().map(span_of).or(self.source_pool.as_ref().map(span_of));
                        return Err(loc.err(
                            at.unwrap_or(0),
                            format!(
                                "backend \"{name}\": source_pool has no {} address for server {}",
                                if s.addr.0.is_ipv4() { "IPv4" } else { "IPv6" },
                                s.addr
                            ),
                        ));
                    }
                }
            }
            let queue = *b.queue.get_ref();
            if queue > 1 << 20 {
                return Err(loc.err(span_of(&b.queue), format!("backend \"{name}\": queue = {queue}: at most 1048576")));
            }
            let health = match &b.health {
                None => None,
                Some(h) => {
                    let at = span_of(h);
                    let h = h.get_ref();
                    let bad = |what: &str| loc.err(at, format!("backend \"{name}\": health: {what}"));
                    let key = |k: &str| format!("backend \"{name}\": health.{k}");
                    let interval = duration(loc, &key("interval"), &h.interval, Duration::from_secs(2))?;
                    let timeout = duration(loc, &key("timeout"), &h.timeout, interval)?;
                    if h.rise == 0 || h.fall == 0 {
                        return Err(bad("rise and fall must be at least 1"));
                    }
                    let send = unescape(h.send.as_deref().unwrap_or("")).map_err(|e| bad(&format!("send: {e}")))?;
                    let expect =
                        unescape(h.expect.as_deref().unwrap_or("")).map_err(|e| bad(&format!("expect: {e}")))?;
                    Some(HealthCheck { interval, timeout, rise: h.rise, fall: h.fall, send, expect })
                }
            };
            backends.push(BackendConfig { name: name.clone(), servers, pool, queue, balance: b.balance, health });
        }

        let mut frontends = Vec::with_capacity(self.frontend.len());
        let mut fnames = HashSet::new();
        let mut listens = HashSet::new();
        for f in &self.frontend {
            let name = f.name.get_ref();
            check_name(loc, &f.name, "frontend.name")?;
            if !fnames.insert(name.as_str()) {
                return Err(loc.err(span_of(&f.name), format!("frontend.name: duplicate frontend \"{name}\"")));
            }
            let listen: SocketAddr = f.listen.get_ref().parse().map_err(|_| {
                loc.err(
                    span_of(&f.listen),
                    format!("frontend \"{name}\": listen: \"{}\" is not an ip:port address", f.listen.get_ref()),
                )
            })?;
            if listen.port() != 0 && !listens.insert(listen) {
                return Err(loc.err(span_of(&f.listen), format!("frontend \"{name}\": listen: {listen} is used twice")));
            }
            let backend = backends.iter().position(|b| &b.name == f.backend.get_ref()).ok_or_else(|| {
                loc.err(
                    span_of(&f.backend),
                    format!("frontend \"{name}\": backend: no [[backend]] named \"{}\"", f.backend.get_ref()),
                )
            })?;
            let maxconn = match &f.maxconn {
                None => None,
                Some(m) => {
                    let v = *m.get_ref();
                    if v == 0 || v > maxconn {
                        return Err(loc.err(
                            span_of(m),
                            format!("frontend \"{name}\": maxconn = {v}: must be between 1 and the global maxconn ({maxconn})"),
                        ));
                    }
                    Some(v)
                }
            };
            frontends.push(FrontendConfig { name: name.clone(), listen, backend, maxconn });
        }

        let metrics_listen = match &self.metrics_listen {
            None => None,
            Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|_| {
                loc.err(span_of(m), format!("metrics_listen: \"{}\" is not an ip:port address", m.get_ref()))
            })?),
        };
        Ok(Config {
            control_socket: self.control_socket.unwrap_or_else(|| crate::control::default_path(&self.pin_path)),
            access_log: self.access_log,
            metrics_listen,
            dataplane: self.dataplane,
            pin_path: self.pin_path,
            workers,
            maxconn,
            connect_attempts,
            timeouts,
            frontends,
            backends,
        })
    }
}

/// A duration key's value, or `default` when absent: more than 0, at most
/// [`MAX_DURATION`]. `key` names it in errors (`timeouts.idle`).
fn duration(
    loc: &Locator<'_>,
    key: &str,
    value: &Option<Spanned<HumanDuration>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let HumanDuration { value, text } = v.get_ref();
    if value.is_zero() {
        return Err(loc.err(span_of(v), format!("{key}: must be greater than 0")));
    }
    if *value > MAX_DURATION {
        return Err(loc.err(span_of(v), format!("{key} = \"{text}\": at most 365 days")));
    }
    Ok(*value)
}

/// Validates a `source_pool` / `source_port_range` pair.
fn parse_pool(
    loc: &Locator<'_>,
    pool_key: &str,
    range_key: &str,
    pool: &Option<Spanned<Vec<Spanned<String>>>>,
    range: &Option<Spanned<String>>,
) -> Result<SourcePool, ConfigError> {
    let mut out = SourcePool::default();
    if let Some(p) = pool {
        if p.get_ref().is_empty() {
            return Err(loc.err(
                span_of(p),
                format!("{pool_key} is empty: list addresses or CIDRs, or remove the key to let the kernel choose"),
            ));
        }
        for entry in p.get_ref() {
            let addrs = expand(entry.get_ref())
                .map_err(|why| loc.err(span_of(entry), format!("{pool_key}: \"{}\" {why}", entry.get_ref())))?;
            for a in addrs {
                if out.addrs.contains(&a) {
                    return Err(loc.err(span_of(entry), format!("{pool_key}: {a} is listed twice")));
                }
                match crate::sys::is_local_address(a) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(loc.err(
                            span_of(entry),
                            format!("{pool_key}: {a} is not an address of this host (add it to an interface first)"),
                        ));
                    }
                    Err(e) => {
                        return Err(loc.err(span_of(entry), format!("{pool_key}: cannot check {a}: {e}")));
                    }
                }
                out.addrs.push(a);
            }
        }
    }
    if let Some(r) = range {
        let bad = || {
            loc.err(
                span_of(r),
                format!("{range_key} = \"{}\": expected \"LOW-HIGH\" with 1 <= LOW <= HIGH <= 65535", r.get_ref()),
            )
        };
        let (lo, hi) = r.get_ref().split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        if !crate::sys::has_local_port_range() {
            return Err(loc.err(
                span_of(r),
                format!("{range_key}: this kernel has no IP_LOCAL_PORT_RANGE (Linux 6.3 or later); remove the key"),
            ));
        }
        out.port_range = Some((lo, hi));
    }
    Ok(out)
}

/// `"127.0.1.1"` or `"127.0.2.0/29"` into addresses.
fn expand(s: &str) -> Result<Vec<IpAddr>, String> {
    let Some((ip, prefix)) = s.split_once('/') else {
        return s.parse::<IpAddr>().map(|a| vec![a]).map_err(|_| "is not an IP address or CIDR".into());
    };
    let ip: IpAddr = ip.parse().map_err(|_| "is not a valid CIDR (address part)".to_owned())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u32 =
        prefix.parse().ok().filter(|p| *p <= bits).ok_or(format!("has an invalid prefix length (0-{bits})"))?;
    let count: u128 = 1u128 << (bits - prefix).min(127);
    if count > MAX_CIDR_ADDRS {
        return Err(format!("expands to more than {MAX_CIDR_ADDRS} addresses"));
    }
    let base: u128 = match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    if base & (count - 1) != 0 {
        return Err(format!("has host bits set (the network is {})", network(ip, base & !(count - 1))));
    }
    Ok((0..count).map(|i| network(ip, base + i)).collect())
}

fn network(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// The dotted key whose value sits at `offset` (`timeouts.connect`), if the
/// line there is a `key = value` line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

fn check_name(loc: &Locator<'_>, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let n = name.get_ref();
    let ok = !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(loc.err(name.span().start, format!("{key}: \"{n}\" must be 1-64 characters of [A-Za-z0-9._-]")))
    }
}

/// The configuration `cargo xtask demo` and `lb run` without `--config` show as an example.
pub const EXAMPLE: &str = include_str!("../../tests/fixtures/valid/basic.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_is_valid() {
        let c = Config::parse("basic.toml", EXAMPLE).unwrap();
        assert_eq!(c.frontends[0].name, "web");
        assert_eq!(c.backends[0].servers.len(), 2);
    }

    #[test]
    fn defaults_keep_long_lived_connections() {
        let c = Config::parse("basic.toml", EXAMPLE).unwrap();
        // A client with a 4-minute heartbeat must never be closed as idle.
        assert!(c.timeouts.idle > Duration::from_secs(4 * 60), "default idle {:?}", c.timeouts.idle);
        assert_eq!(c.workers, 1);
        assert!(c.maxconn >= 1);
        assert!(c.backends[0].pool.addrs.is_empty() && c.backends[0].pool.port_range.is_none());
    }

    #[test]
    fn cidr_expansion() {
        assert_eq!(expand("127.0.2.0/30").unwrap().len(), 4);
        assert_eq!(expand("127.0.2.3/32").unwrap(), vec!["127.0.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(expand("::1/128").unwrap().len(), 1);
        assert!(expand("127.0.2.1/30").unwrap_err().contains("host bits"));
        assert!(expand("127.0.2.0/33").unwrap_err().contains("prefix"));
        assert!(expand("10.0.0.0/8").unwrap_err().contains("more than"));
        assert!(expand("nope").is_err());
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = Config::parse(
            "x.toml",
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackend = \"nope\"\n\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "x.toml:4: frontend \"web\": backend: no [[backend]] named \"nope\"");
    }
}
