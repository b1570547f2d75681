//! `[guard]`: the XDP guard's interfaces, lists and SYN rate, validated.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::{ConfigError, error::Locator, host::Host, raw};

/// The validated `[guard]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// Interfaces the XDP program is attached to.
    pub interfaces: Vec<String>,
    /// Sources dropped (unless in `allow`).
    pub deny: Vec<IpNet>,
    /// Sources always let through.
    pub allow: Vec<IpNet>,
    /// SYNs per second per source to the frontends' ports (0: no limit).
    pub syn_rate: u64,
    /// SYNs a source may send at once.
    pub syn_burst: u64,
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or an address (a `/32` or `/128`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = match s.split_once('/') {
        None => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("\"{s}\" is not an IP address or CIDR"))?,
        Some(_) => s.parse::<IpNet>().map_err(|_| format!("\"{s}\" is not a valid CIDR"))?,
    };
    if net.trunc() != net {
        return Err(format!("\"{s}\" has host bits set (the network is {})", net.trunc()));
    }
    Ok(net)
}

pub fn validate(loc: &Locator<'_>, host: &dyn Host, g: &Spanned<raw::Guard>) -> Result<GuardConfig, ConfigError> {
    let raw = g.get_ref();
    if raw.interfaces.is_empty() {
        return Err(loc.at(g, "guard.interfaces: name at least one interface to attach the XDP guard to"));
    }
    let mut out = GuardConfig::default();
    for i in &raw.interfaces {
        let name = i.get_ref();
        if !host.has_interface(name) {
            return Err(loc.at(i, format!("guard.interfaces: no interface \"{name}\" on this host")));
        }
        if out.interfaces.contains(name) {
            return Err(loc.at(i, format!("guard.interfaces: \"{name}\" is listed twice")));
        }
        out.interfaces.push(name.clone());
    }
    for (key, list, into) in [("deny", &raw.deny, &mut out.deny), ("allow", &raw.allow, &mut out.allow)] {
        for e in list {
            let net = parse_cidr(e.get_ref()).map_err(|why| loc.at(e, format!("guard.{key}: {why}")))?;
            if into.contains(&net) {
                return Err(loc.at(e, format!("guard.{key}: {net} is listed twice")));
            }
            if into.len() >= lb_common::maps::MAX_GUARD_RULES as usize {
                return Err(loc.at(e, format!("guard.{key}: more than {} entries", lb_common::maps::MAX_GUARD_RULES)));
            }
            into.push(net);
        }
    }
    let max = lb_common::guard::MAX_SYN_RATE;
    out.syn_rate = match &raw.syn_rate {
        None => 0,
        Some(r) if *r.get_ref() == 0 || *r.get_ref() > max => {
            return Err(loc.at(
                r,
                format!("guard.syn_rate = {}: must be between 1 and {max} (SYNs per second per source)", r.get_ref()),
            ));
        }
        Some(r) => *r.get_ref(),
    };
    out.syn_burst = match &raw.syn_burst {
        None => out.syn_rate,
        Some(b) if out.syn_rate == 0 => return Err(loc.at(b, "guard.syn_burst: set syn_rate too")),
        Some(b) if *b.get_ref() == 0 || *b.get_ref() > out.syn_rate * 100 => {
            return Err(loc.at(b, format!("guard.syn_burst = {}: must be between 1 and 100 × syn_rate", b.get_ref())));
        }
        Some(b) => *b.get_ref(),
    };
    Ok(out)
}
