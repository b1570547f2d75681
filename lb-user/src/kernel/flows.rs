//! The packet plane's maps: `LB_FLOWS` (two entries per joined
//! connection), the slots' rings of ends, and the TC program's counters.

use std::path::Path;

use aya::maps::{ArrayOfMaps, HashMap, MapData, PerCpuArray, RingBuf};
use lb_common::{
    maps::{ARRIVALS, FLOW_CTL, FLOWS, HANDSHAKE, PACKET_COUNTERS, PACKET_ENDS, PACKET_ENDS_RING_BYTES},
    packet::{Flow, FlowCtl, FlowKey, Handshake, PacketCounters},
    stats::COUNTERS_KEY,
};

use super::{KernelError, open};

/// `LB_FLOWS` with `LB_FLOW_CTL`, the handshakes `lb_setup` recorded and
/// the interfaces the TC program saw them arrive on.
pub struct FlowMaps {
    flows: HashMap<MapData, FlowKey, Flow>,
    ctl: HashMap<MapData, u64, FlowCtl>,
    handshakes: HashMap<MapData, u64, Handshake>,
    arrivals: HashMap<MapData, FlowKey, u32>,
}

impl FlowMaps {
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            flows: open(pin_path, FLOWS)?,
            ctl: open(pin_path, FLOW_CTL)?,
            handshakes: open(pin_path, HANDSHAKE)?,
            arrivals: open(pin_path, ARRIVALS)?,
        })
    }

    /// The interface the handshake's packet with `key` arrived on, if the
    /// TC program saw it.
    pub fn arrival(&self, key: &FlowKey) -> Option<u32> {
        self.arrivals.get(key, 0).ok()
    }

    /// Writes what lb tells the program about connection `id`.
    pub fn put_ctl(&mut self, id: u64, ctl: FlowCtl) -> Result<(), KernelError> {
        self.ctl.insert(id, ctl, 0).map_err(|source| KernelError::Map { name: FLOW_CTL, source })
    }

    /// The handshake of the socket with `cookie`, if `lb_setup` recorded
    /// it; removed.
    pub fn take_handshake(&mut self, cookie: u64) -> Option<Handshake> {
        let h = self.handshakes.get(&cookie, 0).ok()?;
        let _ = self.handshakes.remove(&cookie);
        Some(h)
    }

    fn fd(&self) -> &aya::maps::MapFd {
        aya::maps::IterableMap::map(&self.flows).fd()
    }

    /// Writes both directions of a connection in one `bpf()`.
    pub fn put(&mut self, keys: [FlowKey; 2], flows: [Flow; 2]) -> Result<(), KernelError> {
        super::batch::update(self.fd(), &keys, &flows)
            .map_err(|source| KernelError::Io { what: format!("map {FLOWS}: writing a connection's flows"), source })
    }

    /// Writes one entry (a [`lb_common::packet::TURN`]).
    pub fn put_one(&mut self, key: FlowKey, flow: Flow) -> Result<(), KernelError> {
        self.flows.insert(key, flow, 0).map_err(|source| KernelError::Map { name: FLOWS, source })
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
    pub fn entries(&self) -> u64 {
        self.flows.keys().filter(Result::is_ok).count() as u64
    }

    /// Removes the flows of connection `id` under `keys`, in one `bpf()`,
    /// leaving any key that names another connection by now: a new
    /// connection that reused the addresses (a client port, lb's source
    /// port) while the old one's flows lingered has its own under them.
    pub fn remove_of(&mut self, id: u64, keys: &[FlowKey]) {
        let mine: Vec<FlowKey> = keys.iter().filter(|k| self.get(k).is_some_and(|f| f.id == id)).copied().collect();
        self.remove(&mine);
        let _ = self.ctl.remove(&id);
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
