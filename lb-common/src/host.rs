//! Facts about the host that lb and its tools read the same way.

/// How many ephemeral ports this network namespace has
/// (`net.ipv4.ip_local_port_range`, both ends included).
pub fn ephemeral_ports() -> Option<u32> {
    ephemeral_range().map(|(lo, hi)| u32::from(hi - lo) + 1)
}

/// `net.ipv4.ip_local_port_range` of this network namespace: first and
/// last port, inclusive.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (hi >= lo).then_some((lo, hi))
}

/// How many CPUs the kernel may ever bring up (`/sys/devices/system/cpu/possible`,
/// `0-N`): per-CPU maps allocate a slot for each. 1 if it cannot be read.
pub fn possible_cpus() -> u32 {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let count = |range: &str| -> Option<u32> {
        match range.trim().split_once('-') {
            Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
            None => range.trim().parse::<u32>().ok().map(|_| 1),
        }
    };
    s.trim().split(',').map(count).sum::<Option<u32>>().unwrap_or(1).max(1)
}

/// Whether a thread of process `pid` is runnable (state `R` in
/// `/proc/<pid>/task/<tid>/stat`): waiting for a CPU, not for an event.
pub fn runnable(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(std::format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('R')))
            .unwrap_or(false)
    })
}

/// User plus system CPU time of every thread of process `pid`, in clock
/// ticks (`/proc/<pid>/stat`, fields 14 and 15); `None` if it cannot be read.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(std::format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_runnable_while_it_runs() {
        // This thread is running (state R) while it reads its own stat.
        assert!(super::runnable(std::process::id()));
        assert!(!super::runnable(u32::MAX), "no such process");
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let t = super::cpu_ticks(std::process::id()).expect("own /proc/<pid>/stat");
        // Spin until the count moves (a tick is 10 ms of CPU), for at most 5 s.
        let spin = std::time::Instant::now();
        while super::cpu_ticks(std::process::id()).unwrap() == t {
            assert!(spin.elapsed() < std::time::Duration::from_secs(5), "5 s of spinning added no tick");
            std::hint::black_box((0..1000u64).sum::<u64>());
        }
    }
}
