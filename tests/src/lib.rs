//! Test kit: start `lb` as a real process, real backends on loopback port 0,
//! deterministic byte streams to check transfers, and /proc readers.

pub mod backends;
pub mod lbproc;
pub mod netns;
pub mod stream;

use std::time::{Duration, Instant};

pub use lbproc::{Lb, Mode};

/// For each `async fn name(mode: Mode)` listed, a `kernel::name` and a
/// `userspace::name` test (two runtime threads each) that call it with that
/// data plane.
#[macro_export]
macro_rules! both_planes {
    ($($name:ident),* $(,)?) => {
        mod kernel {
            $(#[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Mode::Kernel).await })*
        }
        mod userspace {
            $(#[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Mode::Userspace).await })*
        }
    };
}

/// Polls `f` until it returns `Some` or `deadline` passes.
pub async fn retry_until<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) of a process, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// A `/proc/PID/status` field in kB (e.g. `VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pages of memory the kernel charges to TCP sockets (`/proc/net/sockstat`, TCP mem).
pub fn tcp_mem_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter().position(|&x| x == "mem").and_then(|i| f.get(i + 1)?.parse().ok())
        })
        .unwrap_or(0)
}
