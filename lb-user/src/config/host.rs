//! What validation needs to know about the host it runs on, behind a trait
//! so that parsing itself makes no system call a test cannot replace.

use std::net::{IpAddr, SocketAddr};

use toml::Spanned;

use super::{ConfigError, error::Locator};

pub trait Host {
    /// Whether `ip` is an address of this host (in this network namespace).
    fn is_local(&self, ip: IpAddr) -> std::io::Result<bool>;
    /// Whether the kernel has `IP_LOCAL_PORT_RANGE` (Linux 6.3+).
    fn has_local_port_range(&self) -> bool;
    /// The hard open-files limit (`ulimit -Hn`).
    fn nofile_hard_limit(&self) -> u64;
    /// Whether a network interface of this name exists (in this namespace).
    fn has_interface(&self, name: &str) -> bool;
    /// Why a listening socket cannot be bound at `addr` now (busy), if it
    /// cannot; `None` when it can or when this host does not probe.
    fn bind_error(&self, _addr: SocketAddr) -> Option<std::io::Error> {
        None
    }
    /// Possible CPUs: per-CPU parts of the maps are allocated for each.
    fn possible_cpus(&self) -> u32 {
        lb_common::host::possible_cpus()
    }
}

/// The machine lb runs on.
pub struct ThisHost;

impl Host for ThisHost {
    fn is_local(&self, ip: IpAddr) -> std::io::Result<bool> {
        crate::kernel::sys::is_local_address(ip)
    }
    fn has_local_port_range(&self) -> bool {
        crate::kernel::sys::has_local_port_range()
    }
    fn nofile_hard_limit(&self) -> u64 {
        crate::kernel::sys::nofile_hard_limit()
    }
    fn has_interface(&self, name: &str) -> bool {
        crate::kernel::sys::interface_index(name).is_some()
    }
}

/// For a text already validated on this host with [`ThisHost`]: its facts
/// are not asked again (as [`AlreadyChecked`]), but each fixed listen
/// address is probed with a test bind (`lb check`, and `lb run` before it
/// starts), so that a busy port is an error naming its line. Not for a
/// reload, whose ports are the instance's own.
pub struct Probing;

impl Host for Probing {
    fn is_local(&self, ip: IpAddr) -> std::io::Result<bool> {
        AlreadyChecked.is_local(ip)
    }
    fn has_local_port_range(&self) -> bool {
        AlreadyChecked.has_local_port_range()
    }
    fn nofile_hard_limit(&self) -> u64 {
        AlreadyChecked.nofile_hard_limit()
    }
    fn has_interface(&self, name: &str) -> bool {
        AlreadyChecked.has_interface(name)
    }
    fn bind_error(&self, addr: SocketAddr) -> Option<std::io::Error> {
        // As lb binds (SO_REUSEADDR, no SO_REUSEPORT): a listener anyone
        // holds is busy, a port in TIME_WAIT is not.
        std::net::TcpListener::bind(addr).err()
    }
}

/// For a text the supervisor has already validated on this host: a worker
/// parses it again without repeating the address checks (one test bind per
/// pool address per worker).
pub struct AlreadyChecked;

impl Host for AlreadyChecked {
    fn is_local(&self, _: IpAddr) -> std::io::Result<bool> {
        Ok(true)
    }
    fn has_local_port_range(&self) -> bool {
        true
    }
    fn nofile_hard_limit(&self) -> u64 {
        crate::kernel::sys::nofile_hard_limit()
    }
    fn has_interface(&self, _: &str) -> bool {
        true
    }
}

/// Refuses `ip` unless `host` says it is one of its addresses; the error
/// names `key` at the line of `at`.
pub fn require_local<T>(
    loc: &Locator<'_>,
    host: &dyn Host,
    at: &Spanned<T>,
    key: &str,
    ip: IpAddr,
) -> Result<(), ConfigError> {
    match host.is_local(ip) {
        Ok(true) => Ok(()),
        Ok(false) => {
            Err(loc.at(at, format!("{key}: {ip} is not an address of this host (add it to an interface first)")))
        }
        Err(e) => Err(loc.at(at, format!("{key}: cannot check {ip}: {e}"))),
    }
}
