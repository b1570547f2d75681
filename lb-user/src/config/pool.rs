//! `source_pool` and `source_port_range`: addresses and CIDRs to connect
//! from, and the local port range of those connections.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::{ConfigError, SourcePool, error::Locator, host::Host};

/// Largest number of addresses one `source_pool` CIDR may expand to.
const MAX_CIDR_ADDRS: u64 = 1 << 16;

/// Validates a `source_pool` / `source_port_range` pair.
pub fn parse(
    loc: &Locator<'_>,
    host: &dyn Host,
    (pool_key, range_key): (&str, &str),
    pool: &Option<Spanned<Vec<Spanned<String>>>>,
    range: &Option<Spanned<String>>,
) -> Result<SourcePool, ConfigError> {
    let mut out = SourcePool::default();
    if let Some(p) = pool {
        if p.get_ref().is_empty() {
            return Err(loc.at(
                p,
                format!("{pool_key} is empty: list addresses or CIDRs, or remove the key to let the kernel choose"),
            ));
        }
        for entry in p.get_ref() {
            let addrs = expand(entry.get_ref())
                .map_err(|why| loc.at(entry, format!("{pool_key}: \"{}\" {why}", entry.get_ref())))?;
            for a in addrs {
                if out.addrs.contains(&a) {
                    return Err(loc.at(entry, format!("{pool_key}: {a} is listed twice")));
                }
                super::host::require_local(loc, host, entry, pool_key, a)?;
                out.addrs.push(a);
            }
        }
    }
    if let Some(r) = range {
        let bad = || {
            loc.at(
                r,
                format!("{range_key} = \"{}\": expected \"LOW-HIGH\" with 1 <= LOW <= HIGH <= 65535", r.get_ref()),
            )
        };
        let (lo, hi) = r.get_ref().split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        if !host.has_local_port_range() {
            return Err(loc.at(
                r,
                format!("{range_key}: this kernel has no IP_LOCAL_PORT_RANGE (Linux 6.3 or later); remove the key"),
            ));
        }
        out.port_range = Some((lo, hi));
    }
    Ok(out)
}

/// `"127.0.1.1"` or `"127.0.2.0/29"` into addresses (a CIDR's network and
/// broadcast addresses included: on loopback they are usable sources).
fn expand(s: &str) -> Result<Vec<IpAddr>, String> {
    let Some((ip, prefix)) = s.split_once('/') else {
        return s.parse::<IpAddr>().map(|a| vec![a]).map_err(|_| "is not an IP address or CIDR".into());
    };
    let ip: IpAddr = ip.parse().map_err(|_| "is not a valid CIDR (address part)".to_owned())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let net = prefix
        .parse::<u8>()
        .ok()
        .and_then(|p| IpNet::new(ip, p).ok())
        .ok_or(format!("has an invalid prefix length (0-{bits})"))?;
    if net.trunc() != net {
        return Err(format!("has host bits set (the network is {})", net.network()));
    }
    if u32::from(bits - net.prefix_len()) > MAX_CIDR_ADDRS.trailing_zeros() {
        return Err(format!("expands to more than {MAX_CIDR_ADDRS} addresses"));
    }
    Ok(match net {
        IpNet::V4(n) => ipnet::Ipv4AddrRange::new(n.network(), n.broadcast()).map(IpAddr::V4).collect(),
        IpNet::V6(n) => ipnet::Ipv6AddrRange::new(n.network(), n.broadcast()).map(IpAddr::V6).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_expansion() {
        assert_eq!(expand("127.0.2.0/30").unwrap().len(), 4);
        assert_eq!(expand("127.0.2.3/32").unwrap(), vec!["127.0.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(expand("::1/128").unwrap().len(), 1);
        assert_eq!(expand("fd00::/112").unwrap().len(), 65536);
        assert!(expand("127.0.2.1/30").unwrap_err().contains("host bits"));
        assert!(expand("127.0.2.0/33").unwrap_err().contains("prefix"));
        assert!(expand("10.0.0.0/8").unwrap_err().contains("more than"));
        assert!(expand("::/0").unwrap_err().contains("more than"));
        assert!(expand("nope").is_err());
    }
}
