//! The supervisor's children under faults: a worker or holder that cannot
//! be restarted, a holder that hangs, a thread that panics. Each time the
//! rest of the instance serves on and the slot comes back.

use std::time::Duration;

use testkit::{
    Lb,
    backends::Backend,
    lbproc::{kernel_available, scratch},
    retry_until, round_trip,
    traffic::open_checked,
};
use tokio::net::TcpStream;

/// Starts lb on the kernel plane with `body` and extra `env`.
fn start(test: &str, body: &str, env: &[(&str, &str)]) -> Option<Lb> {
    if !kernel_available(test) {
        return None;
    }
    let (dir, pin_path) = scratch();
    let cfg = format!("dataplane = \"kernel\"\npin_path = \"{}\"\n{body}", pin_path.display());
    Some(Lb::launch_with(test, dir, pin_path, &cfg, env))
}

/// A file of this test process under the temporary directory, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lb-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Self(p)
    }
    fn env(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap_or_else(|e| panic!("writing {}: {e}", self.0.display()));
    }
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The worker slot of each of `conns`, from `lb conns`.
fn slots(lb: &Lb, conns: &[TcpStream]) -> Vec<u64> {
    let rows: serde_json::Value = serde_json::from_str(&lb.ctl(&["conns", "--json"])).expect("lb conns --json");
    conns
        .iter()
        .map(|s| {
            let me = s.local_addr().unwrap().to_string();
            let row = rows.as_array().and_then(|r| r.iter().find(|r| r["client"] == me.as_str()));
            row.and_then(|r| r["worker"].as_u64()).unwrap_or_else(|| panic!("{me} not in lb conns: {rows}"))
        })
        .collect()
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until `text` appears `times` times in lb's log.
async fn logged(lb: &Lb, text: &str, times: usize, within: Duration) {
    let seen = retry_until(within, || (lb.stderr().matches(text).count() >= times).then_some(())).await;
    assert!(seen.is_some(), "{text:?} not logged {times} time(s) within {within:?}:\n{}", lb.stderr());
}

/// `n` new clients, each served a round trip.
async fn served(lb: &Lb, n: u32, what: &str) {
    for i in 0..n {
        let mut s = TcpStream::connect(lb.addr).await.unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        round_trip(&mut s, 1000 + i, 0).await.unwrap_or_else(|e| panic!("{what}: client {i}: {e}"));
    }
}

/// A worker, then a holder, that cannot be restarted stops nothing else:
/// the supervisor logs each failure and tries again after a growing pause,
/// the other slot and the connections held go on, and once a start works
/// again the slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restart_is_tried_again_and_stops_nothing_else() {
    let refuse = TempFile::new("refuse-start");
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    let Some(lb) = start("restart_fails", &body, &[("LB_TEST_REFUSE_START", &refuse.env())]) else { return };
    let mut conns = open_checked(lb.addr, 20).await;
    let slot = slots(&lb, &conns);

    refuse.write("worker 0\n");
    kill(lb.workers[0], libc::SIGKILL);
    logged(&lb, "restarting worker 0 failed", 2, Duration::from_secs(10)).await;
    assert!(lb.stderr().contains("restarting worker 0 failed (2 time(s) in a row)"), "{}", lb.stderr());
    for p in [lb.pid, lb.workers[1], lb.holders[0], lb.holders[1]] {
        assert!(testkit::alive(p), "process {p} is gone after a failed worker restart:\n{}", lb.stderr());
    }
    for (i, s) in conns.iter_mut().enumerate() {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("connection {i} while worker 0 is down: {e}"));
    }
    refuse.remove();
    logged(&lb, "worker 0 restarted as pid", 1, Duration::from_secs(15)).await;
    served(&lb, 10, "after worker 0 came back").await;

    refuse.write("holder 1\n");
    kill(lb.holders[1], libc::SIGKILL);
    logged(&lb, "restarting holder 1 failed", 2, Duration::from_secs(10)).await;
    for p in [lb.pid, lb.holders[0]] {
        assert!(testkit::alive(p), "process {p} is gone after a failed holder restart:\n{}", lb.stderr());
    }
    // Slot 0's connections go on (slot 1's went with its holder).
    for (i, s) in conns.iter_mut().enumerate().filter(|(i, _)| slot[*i] == 0) {
        round_trip(s, i as u32, 2).await.unwrap_or_else(|e| panic!("slot 0's connection {i}: {e}"));
    }
    refuse.remove();
    logged(&lb, "holder 1 restarted as pid", 1, Duration::from_secs(20)).await;
    logged(&lb, "worker 1 restarted as pid", 1, Duration::from_secs(20)).await;
    served(&lb, 10, "after holder 1 came back").await;
}

/// A holder that stops (SIGSTOP; a deadlock looks the same: no heartbeat,
/// no CPU time) forwards no close; it is killed and replaced within
/// seconds, the log says what that cost, its slot serves again, and the
/// other slot's connections go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_holder_is_replaced() {
    let be = Backend::echo().await;
    let body = format!("workers = 2\n[timeouts]\nworker = \"1s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(lb) = start("hung_holder", &body, &[]) else { return };
    let mut conns = open_checked(lb.addr, 20).await;
    let slot = slots(&lb, &conns);
    let stopped = lb.holders[0];
    kill(stopped, libc::SIGSTOP);
    let t0 = std::time::Instant::now();
    let hung = format!("holder 0 (pid {stopped}): no heartbeat for 1s (timeouts.worker) and no CPU time since: hung");
    logged(&lb, &hung, 1, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "a stopped holder was found hung after {took:?}");
    assert!(lb.stderr().contains("the connections it holds are lost"), "{}", lb.stderr());
    logged(&lb, "holder 0 restarted as pid", 1, Duration::from_secs(10)).await;
    logged(&lb, "worker 0 restarted as pid", 1, Duration::from_secs(15)).await;
    for (i, s) in conns.iter_mut().enumerate().filter(|(i, _)| slot[*i] == 1) {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("slot 1's connection {i}: {e}"));
    }
    served(&lb, 10, "after holder 0 was replaced").await;
    eprintln!("a stopped holder was found hung and killed after {took:?}");
}

/// A panic in a holder's close watcher ends the holder: left alone, the
/// holder would keep every socket and forward nothing. The supervisor sees
/// it end, restarts it and the slot's worker, and the slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_close_watcher_ends_the_holder_and_it_is_replaced() {
    let trigger = TempFile::new("panic-watcher");
    let be = Backend::echo().await;
    let env = [("LB_TEST_PANIC_WATCHER", trigger.env())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let Some(lb) = start("watcher_panic", &Lb::body(&[be.addr]), &env) else { return };
    let holder = lb.holders[0];
    let mut conns = open_checked(lb.addr, 2).await;
    trigger.write("");
    // Its close is the watcher's next report: it panics there.
    drop(conns.pop());
    logged(&lb, "the close watcher panics (a test setting)", 1, Duration::from_secs(5)).await;
    logged(&lb, &format!("holder 0 (pid {holder}) was killed by signal 6"), 1, Duration::from_secs(5)).await;
    logged(&lb, "holder 0 restarted as pid", 1, Duration::from_secs(10)).await;
    logged(&lb, "worker 0 restarted as pid", 1, Duration::from_secs(15)).await;
    assert!(!testkit::alive(holder), "the holder whose watcher panicked still runs");
    served(&lb, 5, "after the holder was replaced").await;
}
