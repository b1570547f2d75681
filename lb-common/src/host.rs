//! Facts about the host that lb and its tools read the same way.

/// How many ephemeral ports this network namespace has
/// (`net.ipv4.ip_local_port_range`, both ends included).
pub fn ephemeral_ports() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u32>());
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (hi >= lo).then(|| hi - lo + 1)
}
