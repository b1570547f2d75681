//! Syscalls per connection: `strace -f -c` attached to every process of a
//! proxy while ApacheBench opens `n` connections (HTTP/1.0, one request
//! each) through it to nginx. A count, not a timing: strace slows the
//! proxy down, so this runs after the connection-rate measurement, never
//! during it. `LB_BENCH_STRACE_TABLE=1` prints each table (which calls).

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// (all syscalls, `bpf` calls) per connection of `pids`, over `n` connections.
pub fn per_conn(target: SocketAddr, pids: &[u32], n: usize) -> anyhow::Result<(f64, f64)> {
    let out = std::env::temp_dir().join(format!("lb-bench-strace-{}", std::process::id()));
    let mut strace = Command::new("strace");
    strace.args(["-f", "-c", "-q", "-o"]).arg(&out);
    for p in pids {
        strace.args(["-p", &p.to_string()]);
    }
    let mut child = strace.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting strace")?;
    // strace attaches to each thread in turn; give it time before traffic.
    std::thread::sleep(Duration::from_millis(500));
    let ab = Command::new("ab")
        .args(["-q", "-n", &n.to_string(), "-c", "4", &format!("http://{target}/")])
        .output()
        .context("starting ab");
    // Settle the last closes, then detach: strace writes the table on SIGINT.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signals the strace started above, by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    child.wait()?;
    let ab = ab?;
    let text = String::from_utf8_lossy(&ab.stdout);
    let complete = text.lines().find_map(|l| l.strip_prefix("Complete requests:")?.trim().parse::<usize>().ok());
    let failed = text.lines().find_map(|l| l.strip_prefix("Failed requests:")?.trim().parse::<usize>().ok());
    if complete != Some(n) || failed != Some(0) {
        bail!("ab through {target}: {complete:?} complete, {failed:?} failed of {n}");
    }
    let table = std::fs::read_to_string(&out);
    if std::env::var_os("LB_BENCH_STRACE_TABLE").is_some() {
        eprintln!("strace -c of pids {pids:?}:\n{}", table.as_deref().unwrap_or(""));
    }
    let _ = std::fs::remove_file(&out);
    let (total, bpf) = parse(&table?).with_context(|| format!("strace -c wrote no table for pids {pids:?}"))?;
    Ok((total as f64 / n as f64, bpf as f64 / n as f64))
}

/// The `calls` column of strace's summary: the total, and the `bpf` row.
fn parse(table: &str) -> Option<(u64, u64)> {
    Some((testkit::strace_calls(table, "total")?, testkit::strace_calls(table, "bpf").unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_total_and_the_bpf_row() {
        let t = "% time     seconds  usecs/call     calls    errors syscall\n\
                 ------ ----------- ----------- --------- --------- ----------------\n \
                 40.00    0.004000           2      2000           accept4\n \
                 30.00    0.003000           1      6000        12 bpf\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                 100.00    0.010000           1     30000        12 total\n";
        assert_eq!(super::parse(t), Some((30000, 6000)));
        assert_eq!(super::parse("nothing"), None);
    }
}
