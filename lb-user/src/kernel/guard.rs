//! The XDP guard's maps, pinned with the others: its deny and allow tries,
//! the frontends' ports, its settings and its counters. The owner fills
//! them from `[guard]` (and a reload or `lb guard deny` changes them);
//! `lb stats` and `/metrics` read the counters.

use std::{collections::HashSet, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie};
use ipnet::IpNet;
use lb_common::{
    guard::{GuardConf, GuardCounters},
    maps::{GUARD_ALLOW, GUARD_CONF, GUARD_DENY, GUARD_PORTS, GUARD_STATS, GUARD_TOP},
};

use super::{KernelError, open};
use crate::addr::{ip_of, ip16};

/// Which list of the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    Deny,
    Allow,
}

pub struct GuardMaps {
    deny: LpmTrie<MapData, [u8; 16], u8>,
    allow: LpmTrie<MapData, [u8; 16], u8>,
    ports: HashMap<MapData, u16, u8>,
    conf: Array<MapData, GuardConf>,
    stats: PerCpuArray<MapData, GuardCounters>,
    top: HashMap<MapData, [u8; 16], u64>,
}

/// The trie key of `net`: IPv6 bytes, IPv4 as `::ffff:a.b.c.d/96+n`.
fn key(net: &IpNet) -> Key<[u8; 16]> {
    let mapped = if net.addr().is_ipv4() { 96 } else { 0 };
    Key::new(mapped + u32::from(net.prefix_len()), ip16(net.network()))
}

fn net_of(k: &Key<[u8; 16]>) -> Option<IpNet> {
    let (len, data) = (k.prefix_len(), k.data());
    match ip_of(data) {
        IpAddr::V4(a) if len >= 96 => IpNet::new(IpAddr::V4(a), (len - 96) as u8).ok(),
        IpAddr::V4(_) => None,
        a @ IpAddr::V6(_) => IpNet::new(a, len as u8).ok(),
    }
}

/// A source as the guard keys it (`LB_GUARD_RATE`, `LB_GUARD_TOP`): an
/// IPv4 address (`192.0.2.7`), or an IPv6 /64 (`2001:db8:1:2::/64`).
pub fn source_of(k: [u8; 16]) -> String {
    match ip_of(k) {
        IpAddr::V4(a) => a.to_string(),
        a @ IpAddr::V6(_) => IpNet::new(a, 64).map_or_else(|_| a.to_string(), |n| n.trunc().to_string()),
    }
}

impl GuardMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            deny: open(pin_path, GUARD_DENY)?,
            allow: open(pin_path, GUARD_ALLOW)?,
            ports: open(pin_path, GUARD_PORTS)?,
            conf: open(pin_path, GUARD_CONF)?,
            stats: open(pin_path, GUARD_STATS)?,
            top: open(pin_path, GUARD_TOP)?,
        })
    }

    fn trie(&mut self, list: List) -> (&mut LpmTrie<MapData, [u8; 16], u8>, &'static str) {
        match list {
            List::Deny => (&mut self.deny, GUARD_DENY),
            List::Allow => (&mut self.allow, GUARD_ALLOW),
        }
    }

    /// Adds `net` to `list` (false: it was there already).
    pub fn add(&mut self, list: List, net: &IpNet) -> Result<bool, KernelError> {
        if self.list(list).contains(net) {
            return Ok(false);
        }
        self.insert(list, net)?;
        Ok(true)
    }

    fn insert(&mut self, list: List, net: &IpNet) -> Result<(), KernelError> {
        let (t, name) = self.trie(list);
        t.insert(&key(net), 1, 0).map_err(|source| KernelError::Map { name, source })
    }

    /// Removes `net` from `list` (false: it was not there).
    pub fn remove(&mut self, list: List, net: &IpNet) -> Result<bool, KernelError> {
        let (t, _) = self.trie(list);
        Ok(t.remove(&key(net)).is_ok())
    }

    /// The entries of `list`.
    pub fn list(&self, list: List) -> Vec<IpNet> {
        let t = match list {
            List::Deny => &self.deny,
            List::Allow => &self.allow,
        };
        let mut v: Vec<IpNet> = t.keys().filter_map(Result::ok).filter_map(|k| net_of(&k)).collect();
        v.sort();
        v
    }

    /// Makes the maps hold these lists, settings and frontend ports.
    pub fn apply(
        &mut self,
        deny: &[IpNet],
        allow: &[IpNet],
        conf: GuardConf,
        ports: &[u16],
    ) -> Result<(), KernelError> {
        for (list, want) in [(List::Deny, deny), (List::Allow, allow)] {
            // One read of the trie, then only the differences: a list of
            // 65,536 entries must not cost a scan of the trie per entry.
            let have: HashSet<IpNet> = self.list(list).into_iter().collect();
            let want_set: HashSet<&IpNet> = want.iter().collect();
            for old in have.iter().filter(|n| !want_set.contains(n)) {
                self.remove(list, old)?;
            }
            for net in want.iter().filter(|n| !have.contains(*n)) {
                self.insert(list, net)?;
            }
        }
        let old: Vec<u16> = self.ports.keys().filter_map(Result::ok).collect();
        for p in old {
            if !ports.contains(&p) {
                let _ = self.ports.remove(&p);
            }
        }
        for p in ports {
            self.ports.insert(p, 1, 0).map_err(|source| KernelError::Map { name: GUARD_PORTS, source })?;
        }
        self.conf.set(0, conf, 0).map_err(|source| KernelError::Map { name: GUARD_CONF, source })
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<GuardCounters, KernelError> {
        let per_cpu = self.stats.get(&0, 0).map_err(|source| KernelError::Map { name: GUARD_STATS, source })?;
        Ok(per_cpu.iter().fold(GuardCounters::default(), |a, c| a.add(c)))
    }

    /// The `n` sources with the most dropped packets, as [`source_of`] names them.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        // Batched: the map holds up to 65,536 sources, and `/metrics` reads it.
        let mut v: Vec<([u8; 16], u64)> =
            super::batch::lookup_all::<[u8; 16], u64>(aya::maps::IterableMap::map(&self.top).fd()).unwrap_or_default();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v.into_iter().map(|(k, c)| (source_of(k), c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        assert_eq!(source_of(ip16("192.0.2.7".parse().unwrap())), "192.0.2.7");
        assert_eq!(source_of(ip16("2001:db8:1:2::".parse().unwrap())), "2001:db8:1:2::/64");
        assert_eq!(source_of(ip16("::".parse().unwrap())), "::/64");
    }
}
