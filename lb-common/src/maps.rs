//! Names and default sizes of the eBPF maps. Kernel map names are at most 15 bytes.

/// SOCKHASH: key = cookie of the socket that receives (u64, host order),
/// value = the peer socket its bytes are redirected to. No program is attached
/// to this map, so inserting a socket here does not yet divert its data.
pub const PEER: &str = "LB_PEER";

/// SOCKHASH: key = the socket's own cookie, value = the socket itself. The
/// sk_skb stream-verdict program is attached here; inserting a socket starts
/// the in-kernel splice for the bytes it receives.
pub const SPLICE: &str = "LB_SPLICE";

/// HASH: key = socket cookie, value = [`crate::conn::ConnTraffic`].
pub const CONN: &str = "LB_CONN";

/// PERCPU_ARRAY with one entry: [`crate::stats::DataplaneCounters`].
pub const COUNTERS: &str = "LB_COUNTERS";

/// Name of the sk_skb stream-verdict program in the object file.
pub const PROG_VERDICT: &str = "lb_verdict";

/// Default capacity of the socket maps (two sockets per connection).
pub const DEFAULT_MAX_SOCKETS: u32 = 1 << 18;

/// The maps `lb` pins under its `pin_path`.
pub const PINNED: [&str; 4] = [PEER, SPLICE, CONN, COUNTERS];
