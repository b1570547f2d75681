//! The packet plane's maps: `LB_FLOWS` (two entries per joined
//! connection), the slots' rings of ends, and the TC program's counters.

use std::path::Path;

use aya::maps::{ArrayOfMaps, HashMap, MapData, PerCpuArray, RingBuf};
use lb_common::{
    maps::{FLOWS, PACKET_COUNTERS, PACKET_ENDS, PACKET_ENDS_RING_BYTES, PEER_TS},
    packet::{Flow, FlowKey, PacketCounters},
    stats::COUNTERS_KEY,
};

use super::{KernelError, maps::open};

/// `LB_FLOWS`, and the handshakes' TSvals `lb_setup` recorded.
pub struct FlowMaps {
    flows: HashMap<MapData, FlowKey, Flow>,
    peer_ts: HashMap<MapData, u64, u32>,
}

impl FlowMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self { flows: open(pin_path, FLOWS)?, peer_ts: open(pin_path, PEER_TS)? })
    }

    /// The TSval of the packet that completed the handshake of the socket
    /// with `cookie` (its peer's), if `lb_setup` recorded it; removed.
    pub fn take_peer_ts(&mut self, cookie: u64) -> Option<u32> {
        let ts = self.peer_ts.get(&cookie, 0).ok()?;
        let _ = self.peer_ts.remove(&cookie);
        Some(ts)
    }

    fn fd(&self) -> &aya::maps::MapFd {
        aya::maps::IterableMap::map(&self.flows).fd()
    }

    /// Writes both directions of a connection in one `bpf()`.
    pub fn put(&mut self, keys: [FlowKey; 2], flows: [Flow; 2]) -> Result<(), KernelError> {
        super::batch::update(self.fd(), &keys, &flows)
            .map_err(|source| KernelError::Io { what: format!("map {FLOWS}: writing a connection's flows"), source })
    }

    /// One direction, as the program last wrote it.
    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// Removes flows (their connections ended, or a join was given up), in
    /// one `bpf()`; keys already gone are skipped.
    pub fn remove(&mut self, keys: &[FlowKey]) {
        if let Err(e) = super::batch::delete(self.fd(), keys) {
            log::warn!("removing {} flow(s): {e}", keys.len());
        }
    }

    /// How many flows there are (two per joined connection).
    pub fn len(&self) -> u64 {
        self.flows.keys().filter(Result::is_ok).count() as u64
    }

    /// Every flow (client and server direction alike).
    pub fn all(&self) -> Vec<(FlowKey, Flow)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }
}

/// Makes the ring through which the TC program tells the holder of worker
/// slot `slot` of its ended connections, and puts it in that slot of
/// `LB_PACKET_ENDS` (replacing an earlier holder's).
pub fn ends_ring(pin_path: &Path, slot: u16) -> Result<RingBuf<MapData>, KernelError> {
    let mut outer: ArrayOfMaps<MapData, MapData> = open(pin_path, PACKET_ENDS)?;
    let def = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
        0,
        0,
        PACKET_ENDS_RING_BYTES,
        0,
    );
    let err = |source| KernelError::Map { name: PACKET_ENDS, source };
    let ring = MapData::create(def, "LB_PKT_ENDS_RING", None).map_err(err)?;
    outer.set(u32::from(slot), &ring, 0).map_err(err)?;
    RingBuf::try_from(aya::maps::Map::RingBuf(ring)).map_err(err)
}

/// The TC program's counters, summed over CPUs (`None`: no packet plane).
pub fn counters(pin_path: &Path) -> Option<PacketCounters> {
    let m: PerCpuArray<MapData, PacketCounters> = open(pin_path, PACKET_COUNTERS).ok()?;
    let per_cpu = m.get(&COUNTERS_KEY, 0).ok()?;
    Some(per_cpu.iter().fold(PacketCounters::default(), |acc, c| acc.add(c)))
}
