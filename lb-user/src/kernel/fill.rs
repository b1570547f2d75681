//! How full the maps are, from the kernel's own accounting. A map's
//! `/proc/<pid>/fdinfo` entry gives its capacity (`max_entries`) and what
//! it takes now (`memlock`). For a socket map and for a hash map that is
//! not preallocated (`LB_CONN`), `memlock` grows by a fixed step per entry,
//! so the entries are `(memlock - empty) / step`: one read of a small proc
//! file per map, where walking the keys costs a `bpf()` call per entry.
//! The owner measures `empty` (right after it made the maps) and `step`
//! (on a throwaway map of the same kind) and records them in the
//! instance's metadata (`Meta`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{HashMap, Map, MapData, SockHash};
use aya_obj::generated::{BPF_F_NO_PREALLOC, bpf_map_type};
use lb_common::{
    conn::ConnTraffic,
    maps::{
        ARRIVALS, CONN, Capacities, FLOW_CTL, FLOWS, GUARD_ALLOW, GUARD_DENY, GUARD_RATE, GUARD_TOP, HANDSHAKE,
        SERVER_BYTES, SERVERS, SOURCES, SPLICE, TARGET, TARGET_OK,
    },
};
use serde::{Deserialize, Serialize};

/// What one map's `memlock` says about its entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gauge {
    pub map: String,
    /// `memlock` with no entry.
    pub empty: u64,
    /// What one more entry adds.
    pub step: u64,
}

/// What the kernel says about a map now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub capacity: u32,
    /// Bytes the map takes now (its `memlock`).
    pub bytes: u64,
}

/// The capacity and `memlock` of the map behind `fd` (of this process).
pub fn usage(fd: BorrowedFd<'_>) -> Option<Usage> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok());
    Some(Usage { capacity: u32::try_from(field("max_entries")?).ok()?, bytes: field("memlock")? })
}

/// The capacities of the maps lb sizes, as pinned at `pin_path` (by an
/// earlier instance: they keep the capacities it gave them). The guard's
/// pairs count the smaller of the two.
pub fn capacities(pin_path: &std::path::Path) -> Result<Capacities, super::KernelError> {
    let of = |name: &'static str| {
        let m = MapData::from_pin(pin_path.join(name)).map_err(|source| super::KernelError::Map { name, source })?;
        usage(m.fd().as_fd())
            .map(|u| u.capacity)
            .ok_or_else(|| super::KernelError::Program(format!("{name}: no max_entries in its fdinfo")))
    };
    Ok(Capacities {
        conn: of(CONN)?,
        target: of(TARGET)?,
        splice: of(SPLICE)?,
        target_ok: of(TARGET_OK)?,
        servers: of(SERVERS)?,
        sources: of(SOURCES)?,
        server_bytes: of(SERVER_BYTES)?,
        guard_sources: of(GUARD_RATE)?.min(of(GUARD_TOP)?),
        guard_rules: of(GUARD_DENY)?.min(of(GUARD_ALLOW)?),
        flows: of(FLOWS)?,
        handshakes: of(HANDSHAKE)?,
        flow_ctl: of(FLOW_CTL)?,
        arrivals: of(ARRIVALS)?,
    })
}

/// The entries of `map` whose usage is `u`, from its gauge in `gauges`;
/// `None` for a map without one (or metadata from before gauges).
pub fn entries(gauges: &[Gauge], map: &str, u: Usage) -> Option<u64> {
    let g = gauges.iter().find(|g| g.map == map)?;
    (g.step > 0).then(|| u.bytes.saturating_sub(g.empty) / g.step)
}

/// Measures the gauges of `LB_CONN`, `LB_TARGET` and `LB_SPLICE` pinned at
/// `pin_path`, which must be empty. A map that cannot be measured gets no
/// gauge (its fill shows as unknown) and one warning.
pub fn calibrate(pin_path: &std::path::Path) -> Vec<Gauge> {
    let record = u32::try_from(size_of::<ConnTraffic>()).unwrap_or(0);
    let mut out = Vec::new();
    for (map, step) in [(CONN, hash_step(8, record, BPF_F_NO_PREALLOC)), (TARGET, sock_step()), (SPLICE, sock_step())] {
        let empty = MapData::from_pin(pin_path.join(map)).ok().and_then(|m| usage(m.fd().as_fd()));
        match (empty, step) {
            (Some(u), Ok(step)) => out.push(Gauge { map: map.to_owned(), empty: u.bytes, step }),
            (None, _) => log::warn!("{map}: cannot read its memlock; `lb stats` will not show how full it is"),
            (_, Err(e)) => {
                log::warn!("{map}: measuring an entry's memory: {e}; `lb stats` will not show how full it is")
            }
        }
    }
    out
}

/// A throwaway map of `kind` with one slot.
fn scratch(kind: bpf_map_type, key: u32, value: u32, flags: u32) -> Result<MapData, String> {
    let def = aya_obj::Map::new_from_params(kind as u32, key, value, 1, flags);
    MapData::create(def, "lb_gauge", None).map_err(|e| e.to_string())
}

fn memlock(m: &MapData) -> Result<u64, String> {
    usage(m.fd().as_fd()).map(|u| u.bytes).ok_or_else(|| "no memlock in fdinfo".to_owned())
}

/// What one element adds to a hash map of these sizes and flags.
fn hash_step(key: u32, value: u32, flags: u32) -> Result<u64, String> {
    let data = scratch(bpf_map_type::BPF_MAP_TYPE_HASH, key, value, flags)?;
    let before = memlock(&data)?;
    let mut map: HashMap<MapData, u64, ConnTraffic> =
        HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
    map.insert(1, ConnTraffic::default(), 0).map_err(|e| e.to_string())?;
    let after = memlock(aya::maps::IterableMap::map(&map))?;
    Ok(after.saturating_sub(before))
}

/// What one socket adds to a sockhash with 8-byte keys (a listening
/// socket, the only kind that needs no peer).
fn sock_step() -> Result<u64, String> {
    let data = scratch(bpf_map_type::BPF_MAP_TYPE_SOCKHASH, 8, 4, 0)?;
    let before = memlock(&data)?;
    let mut map: SockHash<MapData, u64> = SockHash::try_from(Map::SockHash(data)).map_err(|e| e.to_string())?;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| format!("a listening socket: {e}"))?;
    map.insert(1, listener.as_raw_fd(), 0).map_err(|e| e.to_string())?;
    let after = memlock(aya::maps::IterableMap::map(&map))?;
    Ok(after.saturating_sub(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_from_memlock() {
        let gauges = [Gauge { map: "LB_TARGET".into(), empty: 2_097_536, step: 56 }];
        let u = Usage { capacity: 67_536, bytes: 2_108_736 };
        assert_eq!(entries(&gauges, "LB_TARGET", u), Some(200));
        assert_eq!(entries(&gauges, "LB_SPLICE", u), None, "no gauge: unknown");
        assert_eq!(entries(&[Gauge { step: 0, ..gauges[0].clone() }], "LB_TARGET", u), None);
    }

    /// On a kernel with map memory accounting (6.4 and later), both kinds
    /// of map grow by a step per entry.
    #[test]
    fn steps_are_measured() {
        match (hash_step(8, 104, BPF_F_NO_PREALLOC), sock_step()) {
            (Ok(h), Ok(s)) => {
                assert!((160..=256).contains(&h), "LB_CONN record: {h} bytes");
                assert!((48..=128).contains(&s), "sockhash entry: {s} bytes");
            }
            (h, s) => {
                assert!(std::env::var_os("CI").is_none(), "measuring steps under CI: {h:?} {s:?}");
                eprintln!("skipped: cannot make BPF maps here: {h:?} {s:?}");
            }
        }
    }
}
