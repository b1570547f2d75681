//! Test kit: start `lb` as a real process, real backends on loopback port 0,
//! deterministic byte streams to check transfers, and /proc readers.

pub mod across;
pub mod backends;
pub mod external;
pub mod lbproc;
pub mod netns;
pub mod packet;
pub mod stream;
pub mod traffic;

use std::time::{Duration, Instant};

pub use lbproc::{KernelProof, Lb, Mode};
pub use traffic::round_trip;

/// For each `async fn name(mode: Mode)` listed, a `kernel::name` and a
/// `userspace::name` test (two runtime threads each) that call it with that
/// data plane.
#[macro_export]
macro_rules! both_planes {
    ($($name:ident),* $(,)?) => {
        $crate::plane_tests!(kernel, Kernel, $($name),*);
        $crate::plane_tests!(userspace, Userspace, $($name),*);
    };
}

/// [`both_planes!`] plus `kernel_copy_client::name`: the kernel plane with
/// the client side of every connection copied by the close watcher, and
/// `kernel_user_setup::name`: the kernel plane with the workers making
/// every map insert (no `sock_ops` program).
#[macro_export]
macro_rules! every_path {
    ($($name:ident),* $(,)?) => {
        $crate::both_planes!($($name),*);
        $crate::plane_tests!(kernel_copy_client, KernelCopyClient, $($name),*);
        $crate::plane_tests!(kernel_user_setup, KernelUserSetup, $($name),*);
        $crate::plane_tests!(packet, Packet, $($name),*);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! plane_tests {
    ($module:ident, $mode:ident, $($name:ident),*) => {
        mod $module {
            $(#[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Mode::$mode).await })*
        }
    };
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The executable process `pid` runs.
pub fn exe(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Runs `count` clients, `concurrency` at a time: client `i` is
/// `client(i)`, given at most 60 s. Returns their errors.
pub async fn clients<F, Fut>(count: usize, concurrency: usize, client: F) -> Vec<String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let fut = client(i);
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(60), fut)
                .await
                .unwrap_or_else(|_| Err(format!("client {i}: no result within 60 s")));
            drop(permit);
            r
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    failures
}

/// Shuts the write side of each connection, then asserts that each ends
/// with a FIN back (EOF, no more bytes) within `within`; `when` says when
/// in the test, for the message.
pub async fn ends_with_fin_back(conns: &mut [tokio::net::TcpStream], within: Duration, when: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for s in conns.iter_mut() {
        s.shutdown().await.unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(within, s.read_to_end(&mut rest)).await;
        assert!(matches!(r, Ok(Ok(0))), "connection {i}: no FIN back after the client's ({when}): {r:?}");
    }
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

/// A client lb turns away: how long until it was reset (at connect, write
/// or read), or why it was not. A rejected client sees a reset, never a
/// clean EOF.
pub async fn turned_away(addr: std::net::SocketAddr, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(t0.elapsed()),
        Err(e) => return Err(format!("connect: {e}")),
    };
    if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut s, b"x").await {
        return if e.kind() == std::io::ErrorKind::ConnectionReset { Ok(t0.elapsed()) } else { Err(e.to_string()) };
    }
    let mut b = [0u8; 1];
    match tokio::time::timeout(within, tokio::io::AsyncReadExt::read(&mut s, &mut b)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(t0.elapsed()),
        Ok(other) => Err(format!("expected a reset, got {other:?}")),
        Err(_) => Err(format!("neither served nor reset within {within:?}")),
    }
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) of a process, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = lb_common::host::cpu_ticks(pid).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// A `/proc/PID/status` field in kB (e.g. `VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    status_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), field)
}

/// The number of a `status` file's `field` (its unit, if any, left off); 0
/// if it has none.
fn status_field(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pages of memory the kernel charges to TCP sockets (`/proc/net/sockstat`, TCP mem).
pub fn tcp_mem_pages() -> u64 {
    sockstat_tcp("mem")
}

/// Every thread of each of `pids` (`PID/TID NAME`): how often it was
/// switched out (voluntary and not), from `/proc/PID/task/*/status`.
pub fn context_switches(pids: &[u32]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim();
            let n =
                status_field(&status, "voluntary_ctxt_switches") + status_field(&status, "nonvoluntary_ctxt_switches");
            out.push((format!("{pid}/{} {name}", t.file_name().to_string_lossy()), n));
        }
    }
    out
}

/// Asserts that `pids`, left alone, sleep: over two seconds no thread is
/// woken more than 50 times a second (a timer tick of its own is fine; a
/// thread polling every millisecond is not).
pub async fn assert_quiet(pids: &[u32], what: &str) {
    const SECS: u64 = 2;
    let before = context_switches(pids);
    tokio::time::sleep(Duration::from_secs(SECS)).await;
    // Wake-ups per thread that ran throughout (a thread born meanwhile is left out).
    let woken: Vec<(String, u64)> = context_switches(pids)
        .into_iter()
        .filter_map(|(name, n)| {
            let was = before.iter().find(|(b, _)| *b == name)?.1;
            Some((name, n.saturating_sub(was)))
        })
        .collect();
    if let Some((name, n)) = woken.iter().max_by_key(|(_, n)| *n) {
        eprintln!("{what}: busiest lb thread {name}, {n} wake-ups in {SECS} s");
    }
    let busy: Vec<String> = woken
        .iter()
        .filter(|(_, n)| *n > 50 * SECS)
        .map(|(name, n)| format!("{name}: {n} wake-ups in {SECS} s"))
        .collect();
    assert!(busy.is_empty(), "{what}: idle lb threads keep waking up: {busy:?}");
}

/// The `calls` column of `syscall`'s row (or `total`'s) in an `strace -c`
/// summary; `None` without that row.
pub fn strace_calls(table: &str, syscall: &str) -> Option<u64> {
    // Columns: % time, seconds, usecs/call, calls, [errors,] syscall.
    table.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        if *w.last()? != syscall {
            return None;
        }
        w.get(3)?.parse().ok()
    })
}

/// One figure of the TCP line of `/proc/net/sockstat` (`inuse`, `tw`,
/// `alloc`, `mem`); 0 if it cannot be read.
pub fn sockstat_tcp(field: &str) -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter().position(|&x| x == field).and_then(|i| f.get(i + 1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `GET path` over a new connection (HTTP/1.1, `Connection: close`): the
/// body of a 200 answer, or what came instead.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.map_err(|e| format!("read: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!("not a 200 answer: {text:?}")),
    }
}

/// Reads exactly `n` bytes from `s` within 5 s (what an echoing peer sends
/// back); panics naming `what` if they do not come.
pub async fn read_n(s: &mut tokio::net::TcpStream, n: usize, what: &str) -> Vec<u8> {
    let mut back = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_exact(s, &mut back))
        .await
        .unwrap_or_else(|_| panic!("{what}: no echo within 5 s"))
        .unwrap_or_else(|e| panic!("{what}: echo: {e}"));
    back
}
