//! Data-plane counters, one slot per CPU.

/// Index of the single entry of the per-CPU counters array.
pub const COUNTERS_KEY: u32 = 0;

/// What the verdict program did. Userspace sums the per-CPU slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneCounters {
    /// skbs redirected to the peer socket's egress.
    pub skbs_redirected: u64,
    /// Payload bytes in those skbs.
    pub bytes_redirected: u64,
    /// skbs whose socket had no peer in the PEER map (left on the receiving
    /// socket; happens only while a connection is being torn down).
    pub peer_missing: u64,
}
const _: () = assert!(core::mem::size_of::<DataplaneCounters>() == 24);

impl DataplaneCounters {
    /// Field-wise sum, for folding per-CPU slots.
    pub fn add(&self, other: &Self) -> Self {
        Self {
            skbs_redirected: self.skbs_redirected + other.skbs_redirected,
            bytes_redirected: self.bytes_redirected + other.bytes_redirected,
            peer_missing: self.peer_missing + other.peer_missing,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::DataplaneCounters;
    // SAFETY: repr(C), only u64 fields, no padding.
    unsafe impl aya::Pod for DataplaneCounters {}
    unsafe impl bytemuck::Zeroable for DataplaneCounters {}
    unsafe impl bytemuck::Pod for DataplaneCounters {}
}
