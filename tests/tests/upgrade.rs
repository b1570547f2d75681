//! `lb upgrade`: the running instance hands its listening sockets and
//! every spliced connection to a new binary. Nothing is lost or refused,
//! and a binary that cannot take over changes nothing.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use testkit::{
    KernelProof, Lb,
    backends::Backend,
    lbproc::{Launch, kernel_available, lb_bin, scratch},
    retry_until, round_trip,
    traffic::{Finished, Traffic, expect_replies_after_fin, open_checked},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Starts lb on the kernel plane with `body`, extra `env`.
fn start(test: &str, body: &str, env: &[(&str, &str)]) -> Option<Lb> {
    if !kernel_available(test) {
        return None;
    }
    let (dir, pin_path) = scratch();
    let cfg = format!("dataplane = \"kernel\"\npin_path = \"{}\"\n{body}", pin_path.display());
    Some(Lb::launch_as(test, dir, pin_path, &cfg, Launch { env, ..Launch::default() }))
}

/// A copy of the lb binary at another path (the "new release").
fn copy_of_lb(lb: &Lb) -> PathBuf {
    let to = lb.dir.join("lb-next");
    std::fs::copy(lb_bin(), &to).unwrap_or_else(|e| panic!("copying {}: {e}", lb_bin().display()));
    to
}

/// Runs `lb upgrade --binary <binary>` against `lb`: (success, stdout, stderr).
fn upgrade(lb: &Lb, binary: &Path) -> impl std::future::Future<Output = (bool, String, String)> + 'static {
    let (pin, run) = (lb.pin_path.clone(), lb.run_dir.clone());
    let binary = binary.to_owned();
    let run = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(lb_bin())
            .arg("upgrade")
            .arg("--binary")
            .arg(&binary)
            .arg("--pin-path")
            .arg(&pin)
            .arg("--runtime-dir")
            .arg(&run)
            .output()
            .expect("running lb upgrade");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    });
    async move { run.await.unwrap() }
}

/// The new supervisor's pid, from `lb upgrade`'s answer.
fn new_pid(answer: &str) -> u32 {
    Lb::upgraded_pid(answer).unwrap_or_else(|| panic!("no new supervisor pid in {answer:?}"))
}

/// The pids of the workers and holders of the instance whose supervisor is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else { return vec![] };
    let mut all: Vec<u32> = s.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    // Workers and holders are started from the runtime's threads.
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let f = t.path().join("children");
        for p in std::fs::read_to_string(f).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
    }
    all
}

/// 1,000 connections carry checked bytes and a loop opens new ones while
/// `lb upgrade` replaces every process with a copy of the binary at
/// another path: none lost, none refused, the old processes gone, the new
/// ones running the copy, and the stats carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_every_connection_and_refuses_no_client() {
    const CONNS: u32 = 1000;
    const TASKS: usize = 10;
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    // What systemd would hear (Type=notify): ready, then the new main pid.
    let notify_path = std::env::temp_dir().join(format!("lb-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let notify_env = notify_path.to_string_lossy().into_owned();
    let started = start("upgrade", &body, &[("NOTIFY_SOCKET", &notify_env)]);
    let Some(mut lb) = started else { return };
    let heard = |n: &std::os::unix::net::UnixDatagram| {
        let mut b = [0u8; 256];
        n.recv(&mut b).map(|len| String::from_utf8_lossy(&b[..len]).into_owned()).unwrap_or_default()
    };
    assert_eq!(heard(&notify), "READY=1\n", "lb run did not tell systemd it is ready");
    let next = copy_of_lb(&lb);
    let proof = KernelProof::start(&lb);
    let addr = lb.addr;
    let conns = open_checked(addr, CONNS).await;
    lb.await_publication();
    let before = lb.pinned_stats();
    let accepted0 = before["totals"]["accepted"].as_u64().unwrap();
    let old_pids = lb.pids();
    // Traffic on every connection the whole time.
    let traffic = Traffic::start(conns, TASKS);
    let stop = Arc::new(AtomicBool::new(false));
    // New clients the whole time, each served or counted as refused.
    let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let opener = {
        let (stop, served, refused) = (stop.clone(), served.clone(), refused.clone());
        tokio::spawn(async move {
            let mut i = 10_000;
            let mut why = Vec::new();
            while !stop.load(Relaxed) {
                let r = match TcpStream::connect(addr).await {
                    Ok(mut s) => round_trip(&mut s, i, 0).await,
                    Err(e) => Err(format!("connect: {e}")),
                };
                match r {
                    Ok(()) => served.fetch_add(1, Relaxed),
                    Err(e) => {
                        why.push(e);
                        refused.fetch_add(1, Relaxed)
                    }
                };
                i += 1;
            }
            why
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (ok, out, err) = upgrade(&lb, &next).await;
    let took = t0.elapsed();
    assert!(ok, "lb upgrade failed: {err}\n{}", lb.stderr());
    assert!(
        out.contains(&format!("{CONNS} spliced connection(s) handed over")) || out.contains("handed over"),
        "{out}"
    );
    let pid = new_pid(&out);
    lb.upgraded_to(pid);
    assert_eq!(heard(&notify), format!("MAINPID={pid}\nREADY=1\n"), "the new supervisor did not tell systemd");
    let _ = std::fs::remove_file(&notify_path);
    let served_at_upgrade = served.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let Finished { conns: mut all, errors } = traffic.finish().await;
    let why = opener.await.unwrap();
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    assert_eq!(refused.load(Relaxed), 0, "clients refused during the upgrade: {why:?}");
    assert!(served.load(Relaxed) > served_at_upgrade, "no new client served after the upgrade");
    for (i, s) in all.iter_mut().enumerate() {
        round_trip(s, i as u32, u32::MAX).await.unwrap_or_else(|e| panic!("connection {i} after the upgrade: {e}"));
    }
    // Every process of the old binary is gone; the new ones run the copy.
    for p in &old_pids {
        assert!(!testkit::alive(*p), "old process {p} still runs");
    }
    let new_procs: Vec<u32> = std::iter::once(pid).chain(children(pid)).collect();
    assert_eq!(new_procs.len(), 5, "a supervisor, 2 holders and 2 workers: {new_procs:?}");
    for p in &new_procs {
        assert_eq!(testkit::exe(*p).as_deref(), Some(next.as_path()), "process {p} does not run the new binary");
    }
    // The stats carry on: nothing counted before is lost, the connections are counted.
    let want = u64::from(CONNS);
    let counted = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let accepted = s["totals"]["accepted"].as_u64()?;
        (s["totals"]["active"].as_u64()? == want && accepted >= accepted0 + served.load(Relaxed)).then_some(accepted)
    })
    .await;
    assert!(counted.is_some(), "stats after the upgrade (accepted before: {accepted0}): {}", lb.pinned_stats());
    proof.assert_kernel_ran(&lb, "upgrade");
    // lb_setup stays attached through the upgrade (its link is pinned with
    // the maps): the new binary's workers leave the server splice to it too.
    let setups = proof.kernel_setups(&lb);
    for i in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut s, 20_000 + i, 0).await.unwrap_or_else(|e| panic!("client {i} after the upgrade: {e}"));
    }
    let more = proof.kernel_setups(&lb) - setups;
    assert!(more >= 10, "lb_setup set up {more} of 10 connections after the upgrade");
    eprintln!(
        "upgrade with {CONNS} connections and 2 slots: {:.3}s ({out}); {} new clients served meanwhile, 0 refused",
        took.as_secs_f64(),
        served.load(Relaxed)
    );
    drop(all);
    assert!(lb.stop(), "the new instance did not stop");
    assert!(!lb.pin_path.exists(), "the new instance left the pins behind");
}

/// On the packet plane, `lb upgrade` with 1,000 joined connections
/// exchanging checked bytes: none lost, the new instance (a copy of the
/// binary) counts and lists them, new clients are joined by the new
/// programs, and every connection later ends properly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_every_joined_connection() {
    const CONNS: u32 = 1000;
    let be = Backend::echo().await;
    let body = format!("splice = \"packet\"\nworkers = 2\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = start("upgrade_packet", &body, &[]) else { return };
    let next = copy_of_lb(&lb);
    let proof = KernelProof::start(&lb);
    let conns = open_checked(lb.addr, CONNS).await;
    proof.await_joined(&lb, u64::from(CONNS), Duration::from_secs(10), "upgrade_packet").await;
    let traffic = Traffic::start(conns, 10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out, err) = upgrade(&lb, &next).await;
    assert!(ok, "lb upgrade failed: {err}\n{}", lb.stderr());
    lb.upgraded_to(new_pid(&out));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Finished { conns: mut all, errors } = traffic.finish().await;
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    lb.assert_joined_live(u64::from(CONNS), "after the upgrade").await;
    // The new binary's programs join new clients.
    let joined_before = proof.joined(&lb);
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 5000, 0).await.unwrap_or_else(|e| panic!("a new client after the upgrade: {e}"));
    let more = retry_until(Duration::from_secs(5), || (proof.joined(&lb) > joined_before).then_some(())).await;
    assert!(more.is_some(), "no new client joined after the upgrade");
    round_trip(&mut fresh, 5000, 1).await.unwrap_or_else(|e| panic!("the new client once joined: {e}"));
    all.push(fresh);
    testkit::ends_with_fin_back(&mut all, Duration::from_secs(10), "after the upgrade").await;
    assert!(lb.all_ended(Duration::from_secs(10)).await, "connections not counted as ended: {}", lb.pinned_stats());
    eprintln!("upgrade with {CONNS} joined connections: 0 lost");
}

/// A FIN that arrives while neither holder watches (the old one has let
/// go, the new one has not started) is forwarded once the new one has the
/// connection, on both kernel paths (spliced and copied client side).
async fn fin_during_the_hand_over_is_forwarded(copy_client: bool) {
    let be = Backend::echo_after_eof().await;
    let body = Lb::body(&[be.addr]);
    let mut env = vec![("LB_TEST_HANDOVER_PAUSE_MS", "700")];
    if copy_client {
        env.push(("LB_TEST_COPY_CLIENT", "1"));
    }
    let test = if copy_client { "upgrade_fin_copied" } else { "upgrade_fin" };
    let Some(mut lb) = start(test, &body, &env) else { return };
    let next = copy_of_lb(&lb);
    let mut clients = Vec::new();
    let (holder, holder_fds) = (lb.holders[0], testkit::fd_count(lb.holders[0]));
    for i in 0..20u8 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[i; 100]).await.unwrap();
        clients.push(s);
    }
    // Every connection spliced and held before the upgrade starts.
    let held =
        retry_until(Duration::from_secs(5), || (testkit::fd_count(holder) >= holder_fds + 40).then_some(())).await;
    assert!(held.is_some(), "the holder does not hold the 20 connections");
    let mut upgrading = tokio::spawn(upgrade(&lb, &next));
    // Once the old holder has let go, the clients send their FINs.
    let paused = retry_until(Duration::from_secs(10), || {
        if upgrading.is_finished() {
            return Some(false);
        }
        lb.stderr().contains("pausing the hand-over").then_some(true)
    })
    .await;
    assert_eq!(paused, Some(true), "the hand-over never paused:\n{}", lb.stderr());
    for s in &mut clients {
        s.shutdown().await.unwrap();
    }
    let answer = (&mut upgrading).await.unwrap();
    assert!(answer.0, "lb upgrade failed: {}\n{}", answer.2, lb.stderr());
    lb.upgraded_to(new_pid(&answer.1));
    expect_replies_after_fin(&mut clients).await;
    let gone = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["counters"]["conn_entries"].as_u64() == Some(0)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "records of closed connections remain: {}", lb.pinned_stats());
    assert!(lb.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_during_the_hand_over_is_forwarded_spliced() {
    fin_during_the_hand_over_is_forwarded(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_during_the_hand_over_is_forwarded_copied() {
    fin_during_the_hand_over_is_forwarded(true).await;
}

/// A copied client side that finished before the upgrade (every byte and
/// its FIN sent on, its copy buffer freed) is handed over with its count:
/// after the upgrade the replies arrive, the connections close, and the
/// server's `bytes_in` holds every byte the clients sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_copied_side_keeps_its_count_through_an_upgrade() {
    const CLIENTS: u8 = 5;
    let (got, eofs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let (g, e, p) = (got.clone(), eofs.clone(), go.clone());
    let be = Backend::spawn(move |mut s| {
        let (g, e, p) = (g.clone(), e.clone(), p.clone());
        async move {
            let mut bytes = vec![0u8; 100];
            if s.read_exact(&mut bytes).await.is_err() {
                return;
            }
            g.fetch_add(1, Relaxed);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            e.fetch_add(1, Relaxed);
            if let Ok(permit) = p.acquire().await {
                permit.forget();
            }
            bytes.extend(rest);
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let body = Lb::body(&[be.addr]);
    let Some(mut lb) = start("upgrade_copied_done", &body, &[("LB_TEST_COPY_CLIENT", "1")]) else { return };
    let next = copy_of_lb(&lb);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[i; 100]).await.unwrap();
        clients.push(s);
    }
    // Every connection spliced (and its client side copied) before the FINs:
    // a client that half-closes before its splice is served by the worker.
    let copied = retry_until(Duration::from_secs(5), || (got.load(Relaxed) == 5).then_some(())).await;
    assert!(copied.is_some(), "{} of {CLIENTS} reached the backend", got.load(Relaxed));
    for s in &mut clients {
        s.shutdown().await.unwrap();
    }
    let forwarded = retry_until(Duration::from_secs(5), || (eofs.load(Relaxed) == 5).then_some(())).await;
    assert!(forwarded.is_some(), "{} of {CLIENTS} FINs reached the backend", eofs.load(Relaxed));
    let answer = upgrade(&lb, &next).await;
    assert!(answer.0, "lb upgrade failed: {}\n{}", answer.2, lb.stderr());
    assert!(answer.1.contains("5 spliced connection(s) handed over"), "{}", answer.1);
    lb.upgraded_to(new_pid(&answer.1));
    go.add_permits(CLIENTS.into());
    for (i, s) in clients.iter_mut().enumerate() {
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await.unwrap().unwrap();
        assert_eq!(reply, vec![i as u8; 100], "client {i}'s reply:\n{}", lb.stderr());
    }
    let counted = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let row = s["servers"].as_array()?.iter().find(|r| r["addr"] == be.addr.to_string())?.clone();
        (s["totals"]["active"] == 0 && row["bytes_in"] == 500 && row["bytes_out"] == 500).then_some(())
    })
    .await;
    assert!(counted.is_some(), "not closed, or bytes not counted, after the upgrade: {}", lb.pinned_stats());
    assert!(lb.stop());
}

/// A binary that cannot take over (it does not start, or is no file)
/// leaves the running instance exactly as it was, serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_instance_serving() {
    let be = Backend::echo().await;
    let body = Lb::body(&[be.addr]);
    // The new binary (and only it: the hook acts where a new binary checks
    // the running instance) believes the maps are laid out otherwise.
    let Some(lb) = start("upgrade_fails", &body, &[("LB_TEST_PRETEND_LAYOUT", " LB_NEW:8/8")]) else { return };
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut s, 1, 0).await.unwrap();
    let pids = lb.pids();
    let broken = lb.dir.join("lb-broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'lb-broken: cannot start' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, _, err) = upgrade(&lb, &broken).await;
    assert!(!ok, "an upgrade to a binary that exits at once succeeded");
    assert!(err.contains("cannot take over") && err.contains("goes on untouched"), "{err}");
    let (ok, _, err) = upgrade(&lb, &lb.dir.join("no-such-binary")).await;
    assert!(!ok && err.contains("is not a file"), "{err}");
    let (ok, _, err) = upgrade(&lb, &copy_of_lb(&lb)).await;
    assert!(!ok && err.contains("laid out differently") && err.contains("goes on untouched"), "{err}");
    // Nothing changed: the same processes, the old connection and new ones served.
    for p in &pids {
        assert!(testkit::alive(*p), "process {p} of the instance is gone after a failed upgrade");
    }
    round_trip(&mut s, 1, 1).await.unwrap_or_else(|e| panic!("the old connection after a failed upgrade: {e}"));
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 2, 0).await.unwrap_or_else(|e| panic!("a new client after a failed upgrade: {e}"));
    assert!(lb.cli(&["stats"]).0, "lb stats after a failed upgrade");
}

/// SIGUSR2 to `lb run` does what `lb upgrade` does, with the binary at the
/// running one's path, read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place() {
    let be = Backend::echo().await;
    let Some(mut lb) = testkit::Lb::start(testkit::Mode::Kernel, "upgrade_usr2", &[be.addr]) else { return };
    let mut conns = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        round_trip(&mut s, i, 0).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        conns.push(s);
    }
    let old = lb.pids();
    // SAFETY: signalling the lb this test started.
    unsafe { libc::kill(lb.pid as i32, libc::SIGUSR2) };
    let pid = retry_until(Duration::from_secs(10), || {
        let log = lb.stderr();
        let line = log.lines().find(|l| l.contains("new supervisor pid"))?.to_owned();
        Some(new_pid(&line))
    })
    .await
    .unwrap_or_else(|| panic!("SIGUSR2 did not upgrade:\n{}", lb.stderr()));
    lb.upgraded_to(pid);
    for (i, s) in conns.iter_mut().enumerate() {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("connection {i} after SIGUSR2: {e}"));
    }
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 99, 0).await.unwrap_or_else(|e| panic!("a new client after SIGUSR2: {e}"));
    for p in &old {
        assert!(!testkit::alive(*p), "old process {p} still runs after SIGUSR2");
    }
    let counted = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["totals"]["active"].as_u64() == Some(51)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "want 51 active after SIGUSR2: {}", lb.pinned_stats());
    drop((conns, fresh));
    assert!(lb.stop(), "the upgraded instance did not stop");
}

/// A program's kernel id, by `bpftool -j <what> show pinned <path>`'s `key`.
fn bpftool_pinned(what: &str, path: &Path, key: &str) -> u64 {
    let out = std::process::Command::new("bpftool").args(["-j", what, "show", "pinned"]).arg(path).output();
    let out = out.unwrap_or_else(|e| panic!("running bpftool: {e}"));
    assert!(
        out.status.success(),
        "bpftool {what} show pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON");
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in bpftool's {v}"))
}

/// Whether the kernel still has the program with id `id`.
fn program_loaded(id: u64) -> bool {
    let out = std::process::Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]).output();
    out.is_ok_and(|o| o.status.success())
}

/// `lb upgrade` to a binary puts that binary's eBPF programs in place of
/// the running ones: new program ids in `LB_SPLICE` and in the `sock_ops`
/// link (as bpftool sees the pins too), the new binary's object hash in
/// `lb stats`. Connections spliced before keep the verdict they were
/// spliced with and run on; new ones are set up and spliced by the new
/// programs, and still run once the old verdict is gone with the last old
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_puts_the_new_binarys_programs_in_place() {
    let be = Backend::echo().await;
    let Some(mut lb) = start("upgrade_programs", &Lb::body(&[be.addr]), &[]) else { return };
    let next = copy_of_lb(&lb);
    let mut old = open_checked(lb.addr, 20).await;
    let programs = |lb: &Lb| {
        let s = lb.pinned_stats();
        let p = &s["programs"];
        let id = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("programs.{k} in lb stats --json: {s}"));
        (p["ebpf_sha256"].as_str().unwrap_or_default().to_owned(), id("verdict_id"), id("setup_id"))
    };
    let pinned = |lb: &Lb| {
        (
            bpftool_pinned("prog", &lb.pin_path.join("lb_verdict"), "id"),
            bpftool_pinned("link", &lb.pin_path.join("lb_setup_link"), "prog_id"),
        )
    };
    let (hash0, verdict0, setup0) = programs(&lb);
    assert_eq!(pinned(&lb), (verdict0, setup0), "lb stats and the pins disagree");
    let (ok, out, err) = upgrade(&lb, &next).await;
    assert!(ok, "lb upgrade failed: {err}\n{}", lb.stderr());
    lb.upgraded_to(new_pid(&out));
    let (hash, verdict, setup) = programs(&lb);
    assert!(verdict != verdict0 && setup != setup0, "the old programs still act: {verdict0}/{setup0} before and after");
    assert_eq!(pinned(&lb), (verdict, setup), "the pins do not name the programs in place");
    let version = std::process::Command::new(&next).arg("--version").output().expect("lb --version");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(version.contains(&format!("eBPF object sha256 {hash}")) && hash.len() == 64, "{hash} vs {version}");
    assert_eq!(hash, hash0, "a copy of the binary has the same object");
    assert!(program_loaded(verdict0), "the old verdict went while connections spliced with it are open");
    for (i, s) in old.iter_mut().enumerate() {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("old connection {i} after the upgrade: {e}"));
    }
    let proof = KernelProof::start(&lb);
    let mut fresh = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        round_trip(&mut s, 100 + i, 0).await.unwrap_or_else(|e| panic!("new connection {i}: {e}"));
        fresh.push(s);
    }
    proof.assert_all_spliced(&lb, "upgrade_programs");
    assert_eq!(proof.kernel_setups(&lb), 20, "the new sock_ops program did not set up the new connections");
    // The old connections end; with them the old verdict: the new ones never had it.
    drop(old);
    let freed = retry_until(Duration::from_secs(10), || (!program_loaded(verdict0)).then_some(())).await;
    assert!(freed.is_some(), "the old verdict {verdict0} is still loaded after its connections closed");
    for (i, s) in fresh.iter_mut().enumerate() {
        round_trip(s, 100 + i as u32, 1).await.unwrap_or_else(|e| panic!("new connection {i} later: {e}"));
    }
    let counted = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["totals"]["active"].as_u64() == Some(20)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "want the 20 new connections counted: {}", lb.pinned_stats());
    assert!(lb.stop(), "the upgraded instance did not stop");
}

/// A new binary that fails after it took a slot: its holder of that slot
/// outlives its supervisor, and the running instance takes the slot back
/// from it, connections included: none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_failing_after_a_slot_loses_no_connection() {
    const CONNS: u32 = 200;
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    // The hook acts only where a new binary takes slots over.
    let Some(lb) = start("upgrade_fail_after", &body, &[("LB_TEST_UPGRADE_FAIL_AFTER", "0")]) else { return };
    let next = copy_of_lb(&lb);
    let mut conns = open_checked(lb.addr, CONNS).await;
    let (ok, _, err) = upgrade(&lb, &next).await;
    assert!(!ok, "the upgrade succeeded despite the hook");
    assert!(
        err.contains("failed at slot 0") && err.contains("no connection was lost"),
        "lb upgrade said: {err}\n{}",
        lb.stderr()
    );
    assert!(testkit::alive(lb.pid), "the running instance is gone");
    for (i, s) in conns.iter_mut().enumerate() {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("connection {i} after the failed upgrade: {e}"));
    }
    // Every slot serves new clients (none waits at a listener nobody accepts on).
    for i in 0..40 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        round_trip(&mut s, 1000 + i, 0).await.unwrap_or_else(|e| panic!("new client {i}: {e}"));
    }
    let counted = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["totals"]["active"].as_u64() == Some(u64::from(CONNS))).then_some(())
    })
    .await;
    assert!(counted.is_some(), "want {CONNS} active after the failed upgrade: {}", lb.pinned_stats());
}

/// A fault in the hand-over between two holders (`LB_TEST_HANDOVER_FAULT`,
/// with 1 s waits): the new holder's `TookOver` lost, or the old one's
/// commit late. Either way exactly one holder watches the connections
/// afterwards: the old one keeps them, the new one exits having touched
/// nothing, the upgrade fails saying nothing was lost, and every
/// connection goes on and closes cleanly.
async fn a_hand_over_fault_leaves_the_old_holder_alone_watching(fault: &str) {
    let be = Backend::echo().await;
    let env = [("LB_TEST_HANDOVER_FAULT", fault), ("LB_TEST_HANDOVER_STEP_MS", "1000")];
    let test = format!("handover_{fault}");
    let Some(lb) = start(&test, &Lb::body(&[be.addr]), &env) else { return };
    let next = copy_of_lb(&lb);
    let mut conns = open_checked(lb.addr, 20).await;
    let (old_supervisor, old_holder) = (lb.pid, lb.holders[0]);
    let (ok, out, err) = upgrade(&lb, &next).await;
    assert!(!ok, "the upgrade went through despite the fault: {out}\n{}", lb.stderr());
    assert!(err.contains("failed at slot 0") && err.contains("no connection was lost"), "{err}");
    assert!(lb.stderr().contains("keeping all 20 connection(s)"), "{}", lb.stderr());
    assert!(lb.stderr().contains("this holder touched nothing"), "{}", lb.stderr());
    let runs_next = |p: &std::path::Path| testkit::exe(p.file_name()?.to_str()?.parse().ok()?);
    let gone = retry_until(Duration::from_secs(5), || {
        let procs = std::fs::read_dir("/proc").ok()?;
        procs.flatten().all(|p| runs_next(&p.path()).is_none_or(|e| e != next)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "a process of the new binary still runs after the failed upgrade");
    assert!(testkit::alive(old_supervisor) && testkit::alive(old_holder), "the old instance is gone");
    for (i, s) in conns.iter_mut().enumerate() {
        round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("connection {i} after the failed upgrade: {e}"));
    }
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 99, 0).await.unwrap_or_else(|e| panic!("a new client after the failed upgrade: {e}"));
    conns.push(fresh);
    testkit::ends_with_fin_back(&mut conns, Duration::from_secs(5), "after the failed upgrade").await;
    assert!(
        lb.all_ended(Duration::from_secs(5)).await,
        "connections not closed and counted once: {}",
        lb.pinned_stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_took_over_leaves_the_old_holder_alone_watching() {
    a_hand_over_fault_leaves_the_old_holder_alone_watching("lose-took-over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_leaves_the_old_holder_alone_watching() {
    a_hand_over_fault_leaves_the_old_holder_alone_watching("late-commit").await;
}
