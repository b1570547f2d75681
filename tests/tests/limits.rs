//! maxconn and its queue, the idle timeout, and worker processes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use testkit::{KernelProof, Lb, Mode, backends::Backend, retry_until, turned_away};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

testkit::both_planes!(
    server_maxconn_queues_then_rejects,
    global_and_frontend_maxconn_pause_accepting,
    idle_connection_closed_active_kept,
    silent_clients_closed_after_first_byte_timeout,
    descriptor_exhaustion_spares_the_api_and_recovers,
    concurrent_connects_spread_over_the_pool,
);

/// Connects and writes one byte; the echo is awaited separately.
async fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(b"x").await.unwrap();
    s
}

/// Waits up to `within` for the echo of the byte; Err says what happened instead.
async fn echoed(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(within, s.read(&mut b)).await {
        Ok(Ok(1)) => Ok(()),
        Ok(Ok(_)) => Err("closed".into()),
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

async fn through(addr: SocketAddr) -> TcpStream {
    let mut s = open(addr).await;
    echoed(&mut s, Duration::from_secs(3)).await.unwrap_or_else(|e| panic!("client should get through: {e}"));
    s
}

fn spawn_echo_wait(mut s: TcpStream, within: Duration) -> JoinHandle<(Result<(), String>, Duration, TcpStream)> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let r = echoed(&mut s, within).await;
        (r, t0.elapsed(), s)
    })
}

fn totals(lb: &Lb, key: &str) -> u64 {
    lb.pinned_stats()["totals"][key].as_u64().unwrap_or_else(|| panic!("totals.{key} missing"))
}

async fn server_maxconn_queues_then_rejects(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "[timeouts]\nqueue = \"700ms\"\n\n[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [{{ addr = \"{}\", maxconn = 2 }}]\nqueue = 1\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "server_maxconn", &body) else { return };
    let proof = KernelProof::start(&lb);
    let c1 = through(lb.addr).await;
    let _c2 = through(lb.addr).await;
    // Third: waits in the queue (one place).
    let c3 = spawn_echo_wait(open(lb.addr).await, Duration::from_secs(5));
    let queued = retry_until(Duration::from_secs(3), || (totals(&lb, "queued") == 1).then_some(())).await;
    assert!(queued.is_some(), "third client is not queued: {}", lb.pinned_stats());
    // Fourth: the queue is full, reset at once.
    let r = turned_away(lb.addr, Duration::from_secs(2)).await;
    assert!(r.as_ref().is_ok_and(|t| *t < Duration::from_millis(500)), "queue full: expected a quick reset, got {r:?}");
    // A slot frees: the queued client goes through.
    drop(c1);
    let (r, waited, _c3) = c3.await.unwrap();
    assert_eq!(r, Ok(()), "queued client not served after a slot freed (waited {waited:?})");
    // Fifth: queued, nothing frees, reset after timeouts.queue.
    let waited = turned_away(lb.addr, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("fifth client, past maxconn with a full server: {e}"));
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(2),
        "queue timeout is 700 ms, client was reset after {waited:?}"
    );
    let ok = retry_until(Duration::from_secs(3), || (totals(&lb, "queue_rejected") == 2).then_some(())).await;
    assert!(ok.is_some(), "queue rejections should be 2: {}", lb.pinned_stats());
    proof.assert_all_spliced(&lb, "server_maxconn");
}

async fn global_and_frontend_maxconn_pause_accepting(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "maxconn = 3\n\n[[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\nmaxconn = 2\n\n\
         [[frontend]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "maxconn", &body) else { return };
    let proof = KernelProof::start(&lb);
    let (fa, fb) = (lb.frontends[0], lb.frontends[1]);
    let a1 = through(fa).await;
    let _a2 = through(fa).await;
    // Frontend a is at its maxconn: the kernel completes the handshake, lb does not accept.
    let a3 = spawn_echo_wait(open(fa).await, Duration::from_secs(5));
    let b1 = through(fb).await;
    // Now the global maxconn (3) is reached.
    let b2 = spawn_echo_wait(open(fb).await, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a3.is_finished() && !b2.is_finished(), "a client was served beyond maxconn");
    drop(b1); // frees a global slot, and only frontend b may use it
    let (r, _, _b2) = b2.await.unwrap();
    assert_eq!(r, Ok(()), "frontend b's waiting client not served after a global slot freed");
    assert!(!a3.is_finished(), "frontend a served a third client beyond its maxconn of 2");
    drop(a1);
    drop(_b2);
    let (r, _, _a3) = a3.await.unwrap();
    assert_eq!(r, Ok(()), "frontend a's waiting client not served after its slot freed");
    proof.assert_all_spliced(&lb, "maxconn");
}

async fn idle_connection_closed_active_kept(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "[timeouts]\nidle = \"1s\"\n\n[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "idle", &body) else { return };
    let proof = KernelProof::start(&lb);
    // The idle clock starts at the last byte the connection moves: after
    // `sent` (the byte is written then), before `through` returns (its echo
    // is back), stamped by the verdict with a coarse clock that may run up
    // to one jiffy (at most 10 ms) behind.
    let sent = Instant::now();
    let idle = through(lb.addr).await;
    let t0 = Instant::now();
    let idle = tokio::spawn(async move {
        let mut s = idle;
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        (r.map(|r| r.map_err(|e| e.kind())), sent.elapsed(), t0.elapsed())
    });
    // Heartbeat every 250 ms for 3 s: never idle for 1 s.
    let mut busy = through(lb.addr).await;
    while t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        busy.write_all(b"h").await.expect("active connection was closed");
        echoed(&mut busy, Duration::from_secs(1)).await.expect("active connection lost its echo");
    }
    let (r, since_sent, since_echo) = idle.await.unwrap();
    assert!(matches!(r, Ok(Ok(0))), "idle connection should get EOF, got {r:?}");
    assert!(
        since_sent >= Duration::from_millis(990) && since_echo < Duration::from_millis(2500),
        "idle close {since_sent:?} after the last byte was sent, {since_echo:?} after its echo (idle = 1 s)"
    );
    let ok = retry_until(Duration::from_secs(3), || (totals(&lb, "idle_closed") == 1).then_some(())).await;
    assert!(ok.is_some(), "idle_closed should be 1: {}", lb.pinned_stats());
    proof.assert_all_spliced(&lb, "idle");
}

/// Kernel only: 200 idle spliced connections cost the holder no record
/// reads until they could be idle (it used to read both records of every
/// connection every quarter of `timeouts.idle`, at most every 10 s: two
/// `bpf()` per connection held, all the time); then every one of them is
/// closed as idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_looked_at_when_due() {
    const N: usize = 200;
    let be = Backend::echo().await;
    let body = format!("[timeouts]\nidle = \"6s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "idle_due", &body) else { return };
    let proof = KernelProof::start(&lb);
    let mut conns = Vec::new();
    for _ in 0..N {
        conns.push(through(lb.addr).await);
    }
    let t0 = Instant::now();
    let holder = *lb.holders.first().expect("a holder");
    let strace = tokio::process::Command::new("timeout")
        .args(["-s", "INT", "2.5", "strace", "-f", "-c", "-e", "trace=bpf", "-p", &holder.to_string()])
        .output()
        .await
        .expect("strace (installed by cargo xtask setup)");
    let table = String::from_utf8_lossy(&strace.stderr);
    let calls = testkit::strace_calls(&table, "bpf").unwrap_or(0);
    // With no call to count strace prints no table, only that it attached.
    assert!(table.contains("attached"), "strace did not attach to the holder: {table}");
    assert!(t0.elapsed() < Duration::from_secs(5), "the look with strace ran too close to the idle timeout");
    assert!(
        calls < 50,
        "the holder made {calls} bpf() calls in 2.5 s holding {N} connections none of which can be idle yet:\n{table}"
    );
    // Then all of them are idle, and closed as such.
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0))), "connection {i}: want the idle close (EOF), got {r:?}");
    }
    let ok = retry_until(Duration::from_secs(3), || (totals(&lb, "idle_closed") == N as u64).then_some(())).await;
    assert!(ok.is_some(), "idle_closed should be {N}: {}", lb.pinned_stats());
    proof.assert_all_spliced(&lb, "idle_due");
}

/// Two workers: connections spread over both, a killed worker is restarted,
/// and the counts in the maps stay equal to the connections alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_spread_restart_and_stay_consistent() {
    let mode = if testkit::lbproc::kernel_available("two_workers") { Mode::Kernel } else { Mode::Userspace };
    let be = Backend::echo().await;
    let body = format!(
        "workers = 2\n\n[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let lb = Lb::start_with(mode, "two_workers", &body).expect("lb");
    let proof = KernelProof::start(&lb);
    assert_eq!(lb.workers.len(), 2, "announced workers: {:?}", lb.workers);
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(through(lb.addr).await);
    }
    let per_worker = |lb: &Lb| -> Vec<(u64, u64, u64)> {
        let s = lb.pinned_stats();
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["worker"].as_u64().unwrap(), w["pid"].as_u64().unwrap(), w["active"].as_u64().unwrap()))
            .collect()
    };
    let spread = retry_until(Duration::from_secs(3), || {
        let w = per_worker(&lb);
        (w.len() == 2 && w.iter().map(|x| x.2).sum::<u64>() == 200).then_some(w)
    })
    .await
    .unwrap_or_else(|| panic!("workers should hold 200 connections together: {}", lb.pinned_stats()));
    assert!(spread.iter().all(|w| w.2 > 0), "connections not spread over both workers: {spread:?}");

    // Kill worker 0 (a child of the lb we started) the hard way.
    let victim = spread.iter().find(|w| w.0 == 0).unwrap().1 as i32;
    // SAFETY: signalling a process this test started (through lb).
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let restarted = retry_until(Duration::from_secs(10), || {
        let w = per_worker(&lb);
        w.iter().find(|w| w.0 == 0).filter(|w| w.1 as i32 != victim).map(|w| w.1)
    })
    .await;
    assert!(restarted.is_some(), "worker 0 not restarted: {}", lb.pinned_stats());
    let log = lb.stderr();
    assert!(
        log.contains(&format!("worker 0 (pid {victim}) was killed by signal 9; restarting it")),
        "the supervisor did not log why worker 0 ended:\n{log}"
    );

    // On the kernel plane the slot's holder keeps the killed worker's
    // connections; on the userspace plane its clients lost theirs.
    let mut alive = Vec::new();
    for mut c in clients {
        let ok = c.write_all(b"y").await.is_ok() && echoed(&mut c, Duration::from_secs(2)).await.is_ok();
        if ok {
            alive.push(c);
        }
    }
    let survivors = alive.len() as u64;
    match mode {
        Mode::Userspace => assert!(survivors > 0 && survivors < 200, "{survivors} of 200 survived a worker kill"),
        _ => assert_eq!(survivors, 200, "spliced connections lost with a killed worker"),
    }
    for _ in 0..100 {
        alive.push(through(lb.addr).await);
    }
    let want = survivors + 100;
    let consistent = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let active = s["totals"]["active"].as_u64().unwrap();
        let server_active = s["servers"][0]["active"].as_u64().unwrap();
        let kernel_ok = mode == Mode::Userspace || s["counters"]["conn_entries"].as_u64().unwrap() == 2 * want;
        (active == want && server_active == want && kernel_ok).then_some(())
    })
    .await;
    assert!(consistent.is_some(), "maps should count {want} live connections: {}", lb.pinned_stats());
    proof.assert_kernel_ran(&lb, "two_workers");
    eprintln!("[{}] 200 over 2 workers {spread:?}; worker 0 killed, {survivors} survived, restarted", mode.as_str());
}

/// 400 clients at once over a pool of 4: the least-used choice counts
/// connects still in flight, so every address ends up with 100 ± 2.
async fn concurrent_connects_spread_over_the_pool(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nsource_pool = [\"127.0.4.0/30\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "spread", &body) else { return };
    let proof = KernelProof::start(&lb);
    let addr = lb.addr;
    let tasks: Vec<_> = (0..400).map(|_| tokio::spawn(through(addr))).collect();
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    let counts = retry_until(Duration::from_secs(3), || {
        let s = lb.pinned_stats();
        let v: Vec<u64> = s["sources"].as_array()?.iter().filter_map(|r| r["ports_in_use"].as_u64()).collect();
        (v.len() == 4 && v.iter().sum::<u64>() == 400).then_some(v)
    })
    .await
    .unwrap_or_else(|| panic!("4 sources holding 400 connections expected: {}", lb.pinned_stats()));
    assert!(counts.iter().all(|c| (98..=102).contains(c)), "uneven spread over the pool: {counts:?}");
    proof.assert_all_spliced(&lb, "spread");
}

/// With `first_byte_timeout`, clients that connect and send nothing cannot
/// hold every `maxconn` slot: they are closed (and counted) after the
/// timeout, and a client that talks gets through.
async fn silent_clients_closed_after_first_byte_timeout(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "maxconn = 4\n\n[[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\
         first_byte_timeout = \"300ms\"\n\n[[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "first_byte", &body) else { return };
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(lb.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every slot is held by a silent client: this one waits in the backlog.
    let talker = spawn_echo_wait(open(lb.addr).await, Duration::from_secs(5));
    let (r, waited, _t) = talker.await.unwrap();
    assert_eq!(r, Ok(()), "a talking client was not served once the silent ones timed out");
    assert!(waited >= Duration::from_millis(150), "served after {waited:?}: the silent clients held no slot?");
    for (i, mut s) in silent.into_iter().enumerate() {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "silent client {i} not closed: {n:?}");
    }
    let ok = retry_until(Duration::from_secs(3), || (totals(&lb, "first_byte_timeouts") == 4).then_some(())).await;
    assert!(ok.is_some(), "first_byte_timeouts should be 4: {}", lb.pinned_stats());
    assert_eq!(be.accepted.load(std::sync::atomic::Ordering::Relaxed), 1, "silent clients reached the backend");
}

/// Lowers the open-files limit (soft and hard) of process `pid`.
fn set_nofile(pid: u32, limit: usize) {
    let lim = libc::rlimit { rlim_cur: limit as u64, rlim_max: limit as u64 };
    // SAFETY: a valid rlimit for a process this test started; lowering needs no privilege.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
}

/// Like [`open`], but a reset at connect or write (lb gave up on the
/// client at once) is `None` rather than a failure.
async fn open_or_reset(addr: SocketAddr) -> Option<TcpStream> {
    let reset = |e: std::io::Error| {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "connect {addr}: {e}");
    };
    let mut s = TcpStream::connect(addr).await.map_err(reset).ok()?;
    s.write_all(b"x").await.map_err(reset).ok()?;
    Some(s)
}

/// What happened to a client while lb was out of descriptors.
#[derive(Debug, PartialEq)]
enum Fate {
    Served,
    Reset,
    Waiting,
}

async fn fate(s: &mut TcpStream, within: Duration) -> Fate {
    match echoed(s, within).await {
        Ok(()) => Fate::Served,
        Err(e) if e == "no answer" => Fate::Waiting,
        Err(_) => Fate::Reset,
    }
}

/// lb out of descriptors, in a worker, its holder and in the supervisor
/// (their limits lowered under them): nothing dies, spins or blames a server. Clients a
/// worker cannot take wait in the backlog or are reset and counted
/// (`local_resources`); the runtime API lives in the supervisor, whose
/// descriptors clients never take, and answers throughout; the
/// supervisor's own listeners back off and resume; once descriptors are
/// free, every client is served again.
async fn descriptor_exhaustion_spares_the_api_and_recovers(mode: Mode) {
    let be = Backend::echo().await;
    let body = format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, "emfile", &body) else { return };
    let metrics = lb.metrics.expect("metrics address");
    let worker = lb.worker();
    drop(through(lb.addr).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Room for a few connections (two descriptors each), not for 30: in the
    // worker, and in its holder, which keeps spliced connections.
    for pid in lb.slot0() {
        set_nofile(pid, testkit::fd_count(pid) + 9);
    }
    // A client lb resets at once may see the reset already at connect or
    // write (None): that is its fate too.
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(open_or_reset(lb.addr).await);
    }
    // Half a second for lb to serve what it can, then a look at each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // On the kernel plane a client's bytes may flow before its holder
    // refuses the connection for want of descriptors and the worker resets
    // it: a second echo tells a kept client from such a one.
    let mut fates = Vec::new();
    for c in &mut clients {
        fates.push(match c {
            Some(c) => match fate(c, Duration::from_millis(20)).await {
                Fate::Served => {
                    let again = c.write_all(b"z").await.is_ok() && echoed(c, Duration::from_secs(3)).await.is_ok();
                    if again { Fate::Served } else { Fate::Reset }
                }
                f => f,
            },
            None => Fate::Reset,
        });
    }
    let served = fates.iter().filter(|f| **f == Fate::Served).count();
    assert!((1..=8).contains(&served), "{served} of 30 served with 9 spare descriptors: {fates:?}");

    // The API answers while the worker is out of descriptors.
    let srv = be.addr.to_string();
    assert!(lb.ctl(&["server", "drain", "b", &srv]).contains("draining"));
    assert!(lb.ctl(&["server", "enable", "b", &srv]).contains("enabled"));
    let text = tokio::time::timeout(Duration::from_secs(5), testkit::http_get(metrics, "/metrics")).await;
    assert!(matches!(&text, Ok(Ok(t)) if t.contains("lb_connections_active")), "/metrics: {text:?}");

    // Descriptors come back as clients leave: every waiting client is then
    // served or reset, none is left hanging.
    let mut resets = fates.iter().filter(|f| **f == Fate::Reset).count();
    for (c, f) in clients.iter_mut().zip(&fates) {
        if let (Some(c), Fate::Served) = (c, f) {
            let _ = c.shutdown().await;
        }
    }
    let mut later = Vec::new();
    for (c, f) in clients.into_iter().zip(fates) {
        let (Some(mut c), Fate::Waiting) = (c, f) else { continue };
        let got = fate(&mut c, Duration::from_secs(5)).await;
        assert_ne!(got, Fate::Waiting, "a client still waits 5 s after descriptors were freed");
        resets += usize::from(got == Fate::Reset);
        later.push(got);
        drop(c);
    }
    // All descriptors free again: every new client is served (spliced, on the kernel plane).
    let proof = KernelProof::start(&lb);
    let mut fresh = Vec::new();
    for _ in 0..3 {
        fresh.push(through(lb.addr).await);
    }
    proof.assert_all_spliced(&lb, "emfile");
    drop(fresh);
    if mode == Mode::Kernel {
        // Every client is gone: none is listed, nor a record left behind
        // by a connection the holder refused.
        let listed = || serde_json::from_str::<serde_json::Value>(&lb.ctl(&["conns", "--json"])).unwrap();
        let gone = retry_until(Duration::from_secs(5), || listed().as_array().unwrap().is_empty().then_some(())).await;
        assert!(gone.is_some(), "connections listed after every client left: {}", listed());
    }
    assert!(lb.workers.contains(&worker) && testkit::fd_count(worker) > 0, "the worker died");
    lb.await_publication();
    let stats = lb.pinned_stats();
    assert_eq!(
        stats["totals"]["no_local_resources"].as_u64(),
        Some(resets as u64),
        "resets seen {resets} (later: {later:?}): {stats}"
    );
    assert_eq!(stats["totals"]["connect_failures"], 0, "the server was blamed for lb's own limit: {stats}");
    let log = lb.stderr();
    let warnings = log
        .lines()
        .filter(|l| ["accept failed", "no socket for the server", "cannot take"].iter().any(|w| l.contains(w)))
        .count();
    assert!((1..=6).contains(&warnings), "{warnings} rate-limited warnings expected 1-6:\n{log}");

    // The supervisor out of descriptors: silent scrapers take them all, its
    // metrics accept fails, then a control request waits for a descriptor
    // and is answered once the scrapers leave. Meanwhile its watchdog can
    // read neither heartbeat files nor /proc for longer than
    // `timeouts.worker` (2 s): that is no reason to kill anyone.
    let sup = lb.pid;
    set_nofile(sup, testkit::fd_count(sup) + 6);
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(TcpStream::connect(metrics).await.unwrap());
    }
    let failed =
        retry_until(Duration::from_secs(5), || lb.stderr().contains("metrics endpoint: accept failed").then_some(()))
            .await;
    assert!(failed.is_some(), "the metrics endpoint never ran out of descriptors:\n{}", lb.stderr());
    let (pin, run, sock) = (lb.pin_path.clone(), lb.run_dir.clone(), srv.clone());
    let ctl = tokio::task::spawn_blocking(move || {
        std::process::Command::new(testkit::lbproc::lb_bin())
            .args(["server", "drain", "b", &sock, "--pin-path"])
            .arg(pin)
            .arg("--runtime-dir")
            .arg(run)
            .output()
    });
    tokio::time::sleep(Duration::from_millis(2600)).await;
    drop(silent);
    let out =
        tokio::time::timeout(Duration::from_secs(10), ctl).await.expect("control request answered").unwrap().unwrap();
    assert!(out.status.success(), "control request: {}", String::from_utf8_lossy(&out.stderr));
    let text = tokio::time::timeout(Duration::from_secs(5), testkit::http_get(metrics, "/metrics")).await;
    assert!(matches!(&text, Ok(Ok(t)) if t.contains("lb_connections_active")), "/metrics after: {text:?}");
    let gone: Vec<u32> = lb.pids().into_iter().filter(|p| !testkit::alive(*p)).collect();
    assert!(gone.is_empty() && !lb.stderr().contains("killing it"), "processes {gone:?} killed:\n{}", lb.stderr());
}
