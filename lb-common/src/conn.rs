//! Per-socket traffic record written by the verdict program.

/// Traffic seen on one socket of a spliced connection, keyed by its cookie.
/// Userspace creates the entry before the socket is spliced and deletes it
/// after the connection is closed; the verdict program only updates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTraffic {
    /// Bytes received on this socket and redirected to its peer.
    pub bytes: u64,
    /// Redirected skbs.
    pub skbs: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, coarse) of the last redirect.
    pub last_active_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ConnTraffic>() == 24);

#[cfg(feature = "user")]
mod user {
    use super::ConnTraffic;
    // SAFETY: repr(C), only u64 fields, no padding.
    unsafe impl aya::Pod for ConnTraffic {}
    unsafe impl bytemuck::Zeroable for ConnTraffic {}
    unsafe impl bytemuck::Pod for ConnTraffic {}
}
