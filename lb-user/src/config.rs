//! Configuration file: TOML types, defaults and validation.
//!
//! `Config::load` parses and validates; every error names the file, the line
//! and the key, so `lb check` can print `FILE:LINE: message`.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
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
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_attempts() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_max_connections() -> Spanned<u32> {
    Spanned::new(0..0, lb_common::maps::DEFAULT_MAX_SOCKETS / 2)
}

/// `[timeouts]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time allowed for one connect attempt to a server.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: default_connect_timeout() }
    }
}

/// `[[frontend]]`: a listening address and the backend it feeds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub backend: Spanned<String>,
}

/// `[[backend]]`: a named set of servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Spanned<String>,
    pub servers: Spanned<Vec<Spanned<String>>>,
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dataplane: DataplaneMode,
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Capacity of the kernel connection tables (entries are preallocated lazily).
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<u32>,
    /// How many servers to try for one client before giving up.
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: Spanned<u32>,
    #[serde(default)]
    pub timeouts: Timeouts,
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
}

/// A validated backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub name: String,
    pub servers: Vec<ServerAddr>,
}

/// A validated configuration: everything `lb run` needs, nothing unchecked.
#[derive(Clone, Debug)]
pub struct Config {
    pub dataplane: DataplaneMode,
    pub pin_path: PathBuf,
    pub max_connections: u32,
    pub connect_attempts: u32,
    pub timeouts: Timeouts,
    pub frontends: Vec<FrontendConfig>,
    pub backends: Vec<BackendConfig>,
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
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::Read(path.display().to_string(), e))?;
        Ok(Self::parse(&path.display().to_string(), &text)?)
    }

    /// Parses and validates `text`; `file` only labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let loc = Locator { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let mut msg = e.message().trim_end().to_owned();
            if let Some(key) = key_at(text, offset).filter(|k| !msg.contains(k.as_str())) {
                msg.push_str(&format!(" (key {key})"));
            }
            loc.err(offset, msg)
        })?;
        raw.validate(&loc)
    }
}

impl RawConfig {
    fn validate(self, loc: &Locator<'_>) -> Result<Config, ConfigError> {
        if self.frontend.is_empty() {
            return Err(loc.err(0, "no [[frontend]]: at least one is needed"));
        }
        if self.backend.is_empty() {
            return Err(loc.err(0, "no [[backend]]: at least one is needed"));
        }
        let max_connections = *self.max_connections.get_ref();
        if max_connections == 0 || max_connections > (1 << 24) {
            return Err(loc.err(
                self.max_connections.span().start,
                format!("max_connections = {max_connections}: must be between 1 and 16777216"),
            ));
        }
        let connect_attempts = *self.connect_attempts.get_ref();
        if connect_attempts == 0 {
            return Err(loc.err(self.connect_attempts.span().start, "connect_attempts = 0: must be at least 1"));
        }
        if self.timeouts.connect.is_zero() {
            return Err(loc.err(0, "timeouts.connect: must be greater than 0"));
        }

        let mut backends = Vec::with_capacity(self.backend.len());
        let mut names = HashSet::new();
        for b in &self.backend {
            let name = b.name.get_ref();
            check_name(loc, &b.name, "backend.name")?;
            if !names.insert(name.as_str()) {
                return Err(loc.err(b.name.span().start, format!("backend.name: duplicate backend \"{name}\"")));
            }
            if b.servers.get_ref().is_empty() {
                return Err(loc.err(
                    b.servers.span().start,
                    format!("backend \"{name}\": servers is empty; list at least one \"ip:port\""),
                ));
            }
            let mut servers = Vec::new();
            for s in b.servers.get_ref() {
                let addr: SocketAddr = s.get_ref().parse().map_err(|_| {
                    loc.err(
                        s.span().start,
                        format!("backend \"{name}\": servers: \"{}\" is not an ip:port address", s.get_ref()),
                    )
                })?;
                if addr.port() == 0 || addr.ip().is_unspecified() {
                    return Err(loc.err(
                        s.span().start,
                        format!("backend \"{name}\": servers: \"{addr}\" needs a concrete ip and a non-zero port"),
                    ));
                }
                let addr = ServerAddr(addr);
                if servers.contains(&addr) {
                    return Err(
                        loc.err(s.span().start, format!("backend \"{name}\": servers: \"{addr}\" is listed twice"))
                    );
                }
                servers.push(addr);
            }
            backends.push(BackendConfig { name: name.clone(), servers });
        }

        let mut frontends = Vec::with_capacity(self.frontend.len());
        let mut fnames = HashSet::new();
        let mut listens = HashSet::new();
        for f in &self.frontend {
            let name = f.name.get_ref();
            check_name(loc, &f.name, "frontend.name")?;
            if !fnames.insert(name.as_str()) {
                return Err(loc.err(f.name.span().start, format!("frontend.name: duplicate frontend \"{name}\"")));
            }
            let listen: SocketAddr = f.listen.get_ref().parse().map_err(|_| {
                loc.err(
                    f.listen.span().start,
                    format!("frontend \"{name}\": listen: \"{}\" is not an ip:port address", f.listen.get_ref()),
                )
            })?;
            if listen.port() != 0 && !listens.insert(listen) {
                return Err(
                    loc.err(f.listen.span().start, format!("frontend \"{name}\": listen: {listen} is used twice"))
                );
            }
            let backend = backends.iter().position(|b| &b.name == f.backend.get_ref()).ok_or_else(|| {
                loc.err(
                    f.backend.span().start,
                    format!("frontend \"{name}\": backend: no [[backend]] named \"{}\"", f.backend.get_ref()),
                )
            })?;
            frontends.push(FrontendConfig { name: name.clone(), listen, backend });
        }

        Ok(Config {
            dataplane: self.dataplane,
            pin_path: self.pin_path,
            max_connections,
            connect_attempts,
            timeouts: self.timeouts,
            frontends,
            backends,
        })
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
    fn errors_name_line_and_key() {
        let e = Config::parse(
            "x.toml",
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackend = \"nope\"\n\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "x.toml:4: frontend \"web\": backend: no [[backend]] named \"nope\"");
    }
}
