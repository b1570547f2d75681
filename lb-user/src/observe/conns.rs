//! `lb conns`: the live connections, spliced (from their `LB_CONN`
//! records) and joined on the packet plane (from their flows).

use std::{collections::HashMap, net::SocketAddr, path::Path};

use lb_common::{
    conn::{ConnTraffic, SIDE_CLIENT},
    packet::{Flow, FlowKey, JOINED},
};
use serde::Serialize;

use crate::{
    addr::ip_of,
    kernel::{KernelError, flows::FlowMaps, maps::PinnedMaps},
};

/// One spliced connection, from its two `LB_CONN` records.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRow {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The local address lb connected from.
    pub source: SocketAddr,
    pub worker: u16,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// "sockmap", or "packet" for a connection joined on the packet plane
    /// (its bytes counted from the join on).
    pub plane: &'static str,
}

/// Live kernel-spliced connections, optionally only those to `server`.
pub fn conns(pin_path: &Path, server: Option<SocketAddr>) -> Result<Vec<ConnRow>, KernelError> {
    let maps = PinnedMaps::open(pin_path)?;
    let now = crate::kernel::sys::monotonic_coarse_ns();
    let all: HashMap<u64, ConnTraffic> = maps.conn.all_records()?.into_iter().collect();
    let mut rows: Vec<ConnRow> = all
        .values()
        .filter(|c| c.side == SIDE_CLIENT)
        .map(|c| {
            let peer = all.get(&c.peer_cookie);
            let last = c.last_active_ns.max(peer.map_or(0, |p| p.last_active_ns));
            ConnRow {
                client: SocketAddr::new(ip_of(c.client_ip), c.client_port),
                server: SocketAddr::new(ip_of(c.server_ip), c.server_port),
                source: SocketAddr::new(ip_of(c.source_ip), c.source_port),
                worker: c.worker,
                age_secs: now.saturating_sub(c.start_ns) as f64 / 1e9,
                idle_secs: now.saturating_sub(last) as f64 / 1e9,
                bytes_in: c.bytes,
                bytes_out: peer.map_or(0, |p| p.bytes),
                plane: "sockmap",
            }
        })
        .chain(joined(pin_path, now))
        .filter(|r| server.is_none_or(|s| s == r.server))
        .collect();
    rows.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
    Ok(rows)
}

/// Connections joined on the packet plane and not ended, from their two
/// flows (none without the packet plane's maps).
fn joined(pin_path: &Path, now: u64) -> Vec<ConnRow> {
    let Ok(maps) = FlowMaps::open(pin_path) else { return Vec::new() };
    let all: HashMap<FlowKey, Flow> = maps.all().into_iter().collect();
    all.iter()
        .filter(|(_, f)| f.client != 0 && f.ended == 0 && f.state == JOINED)
        .map(|(k, f)| {
            // The client's packets (key: client to lb) become the source's
            // to the server; the server's flow is the other way.
            let back = all.get(&f.reverse_key());
            ConnRow {
                client: SocketAddr::new(ip_of(k.src), u16::from_be(k.sport)),
                server: SocketAddr::new(ip_of(f.dst), u16::from_be(f.dport)),
                source: SocketAddr::new(ip_of(f.src), u16::from_be(f.sport)),
                worker: f.slot,
                age_secs: now.saturating_sub(f.start_ns) as f64 / 1e9,
                idle_secs: now.saturating_sub(f.last_ns.max(back.map_or(0, |b| b.last_ns))) as f64 / 1e9,
                bytes_in: f.bytes,
                bytes_out: back.map_or(0, |b| b.bytes),
                plane: "packet",
            }
        })
        .collect()
}
