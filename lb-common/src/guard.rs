//! The XDP guard's map values: its settings, a source's SYN token bucket,
//! and its counters. Addresses are IPv6 bytes (IPv4 as `::ffff:a.b.c.d`),
//! so one LPM trie holds both families (an IPv4 `/n` is a `/96+n`). The
//! rate buckets and the top offenders are keyed by source: an IPv4 address,
//! or an IPv6 /64 (its last 8 bytes zero).

/// Value of `LB_GUARD_CONF[0]`, written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GuardConf {
    /// SYNs per second each source may send to the frontends' ports (0: no limit).
    pub syn_rate: u64,
    /// SYNs a source may send at once after a quiet spell.
    pub syn_burst: u64,
}
const _: () = assert!(core::mem::size_of::<GuardConf>() == 16);

/// Value of `LB_GUARD_RATE`: one source's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GuardBucket {
    /// Tokens left, in millionths of a SYN.
    pub tokens: u64,
    /// When it was last refilled (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<GuardBucket>() == 16);

/// Value of `LB_GUARD_STATS[0]` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GuardCounters {
    /// Packets let through (`XDP_PASS`).
    pub passed: u64,
    /// Packets from a source in `deny` (and not in `allow`), dropped.
    pub denied: u64,
    /// SYNs over their source's rate, dropped.
    pub rate_limited: u64,
    /// Fragments other than the first (no TCP header in them), passed
    /// after the lists (also counted in `passed`).
    pub fragments: u64,
    /// Packets whose TCP header the guard does not read past to (a third
    /// VLAN tag, more IPv6 extension headers than it walks, an IPv4 TCP
    /// fragment at offset 8), dropped.
    pub unparsed: u64,
}
const _: () = assert!(core::mem::size_of::<GuardCounters>() == 40);

impl GuardCounters {
    /// Field-wise sum, for folding per-CPU slots.
    pub fn add(&self, o: &Self) -> Self {
        Self {
            passed: self.passed + o.passed,
            denied: self.denied + o.denied,
            rate_limited: self.rate_limited + o.rate_limited,
            fragments: self.fragments + o.fragments,
            unparsed: self.unparsed + o.unparsed,
        }
    }
}

/// Millionths of a token per SYN.
pub const TOKEN: u64 = 1_000_000;
/// Largest `syn_rate` (SYNs per second per source).
pub const MAX_SYN_RATE: u64 = 100_000;
/// Longest quiet spell the bucket refills for, in ns: with `syn_rate` at
/// most [`MAX_SYN_RATE`] the refill product stays far below 2^64.
pub const MAX_REFILL_NS: u64 = 100_000_000_000;

#[cfg(feature = "user")]
crate::pod!(GuardConf, GuardBucket, GuardCounters);
