//! The supervisor killed with SIGKILL (a crash, the OOM killer): on the
//! kernel plane its holders outlive it with every spliced connection, the
//! kernel goes on splicing, the holders go on forwarding ends, and the next
//! `lb run` with the same configuration (systemd's `Restart=`) takes them
//! over with new programs. Without a restart they end by themselves once
//! their last connection has, or with `lb stop`.

use std::time::Duration;

use testkit::{
    KernelProof, Lb, Mode,
    backends::Backend,
    retry_until, round_trip,
    traffic::{Finished, Traffic, open_checked},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The program ids `lb stats --json` reports: (verdict, sock_ops).
fn program_ids(lb: &Lb) -> (u64, u64) {
    let s = lb.pinned_stats();
    let id = |k: &str| s["programs"][k].as_u64().unwrap_or_else(|| panic!("programs.{k} in lb stats --json: {s}"));
    (id("verdict_id"), id("setup_id"))
}

/// Waits until `traffic` has made `passes` more passes over every
/// connection; panics with `when` otherwise.
async fn traffic_moves(traffic: &Traffic, passes: u64, when: &str) {
    let want = traffic.rounds() + passes * traffic.tasks();
    let moved = retry_until(Duration::from_secs(15), || (traffic.rounds() >= want).then_some(())).await;
    assert!(moved.is_some(), "traffic stopped {when}");
}

/// Every process in `pids` is gone within 10 s.
async fn all_gone(pids: &[u32], what: &str) {
    let gone = retry_until(Duration::from_secs(10), || pids.iter().all(|p| !testkit::alive(*p)).then_some(())).await;
    assert!(gone.is_some(), "{what} still run: {:?}", pids.iter().filter(|p| testkit::alive(**p)).collect::<Vec<_>>());
}

/// 1,000 spliced connections carry checked bytes through 2 slots; the
/// supervisor is killed with SIGKILL and `lb run` starts again with the
/// same configuration. None is lost and no byte is wrong, before, during
/// and after; the new instance counts every connection (`lb stats`,
/// `lb conns`) with new programs, and each connection later ends properly
/// (the client's FIN reaches the backend, the backend's FIN the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_run_after_a_killed_supervisor_takes_every_connection_over() {
    const CONNS: u32 = 1000;
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Kernel, "crash_adopt", &body) else { return };
    let proof = KernelProof::start(&lb);
    let conns = open_checked(lb.addr, CONNS).await;
    proof.assert_all_spliced(&lb, "crash_adopt");
    let programs_before = program_ids(&lb);
    let (old_supervisor, old_workers, old_holders) = (lb.pid, lb.workers.clone(), lb.holders.clone());
    let traffic = Traffic::start(conns, 10);
    traffic_moves(&traffic, 1, "before the kill").await;

    lb.kill_supervisor();
    all_gone(&old_workers, "workers of the killed supervisor").await;
    assert!(old_holders.iter().all(|p| testkit::alive(*p)), "a holder died with its supervisor");
    traffic_moves(&traffic, 2, "while the supervisor was dead").await;
    // The pins still read, and say what is going on.
    let (ok, _, err) = lb.cli(&["stats"]);
    assert!(ok && err.contains("is gone") && err.contains("lb stop"), "lb stats without a supervisor: {err}");

    lb.restart("crash_adopt", &[]);
    assert_ne!(lb.pid, old_supervisor);
    assert!(lb.stderr().contains("taking over the earlier lb"), "no takeover in the log:\n{}", lb.stderr());
    all_gone(&old_holders, "the earlier holders").await;
    assert!(lb.holders.iter().all(|p| !old_holders.contains(p)), "no new holders: {:?}", lb.holders);
    traffic_moves(&traffic, 2, "after lb run took over").await;
    let Finished { conns: mut all, errors } = traffic.finish().await;
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    for (i, s) in all.iter_mut().enumerate() {
        round_trip(s, i as u32, u32::MAX).await.unwrap_or_else(|e| panic!("connection {i} after the takeover: {e}"));
    }
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 5000, 0).await.unwrap_or_else(|e| panic!("a new client after the takeover: {e}"));

    // Counted by the new instance: its workers took the connections over.
    let want = u64::from(CONNS) + 1;
    let counted = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        (s["totals"]["active"].as_u64()? == want && s["counters"]["conn_entries"].as_u64()? == 2 * want).then_some(())
    })
    .await;
    assert!(counted.is_some(), "want {want} active connections after the takeover: {}", lb.pinned_stats());
    let rows: serde_json::Value = serde_json::from_str(&lb.ctl(&["conns", "--json"])).unwrap();
    let rows = rows.as_array().expect("lb conns --json is a list");
    assert_eq!(rows.len() as u64, want, "lb conns lists every connection");
    let mut busy = 0;
    for r in rows {
        let (up, down) = (r["bytes_in"].as_u64().unwrap(), r["bytes_out"].as_u64().unwrap());
        assert!(up == down && up % 64 == 0, "an echo connection counted {up} bytes up, {down} down");
        // Every old one made round trips before, during and after the kill.
        busy += u32::from(up >= 64 * 6);
    }
    assert_eq!(busy, CONNS, "connections counted with fewer bytes than they carried");
    // This binary's programs act on new connections now.
    let programs_after = program_ids(&lb);
    assert!(
        programs_after.0 != programs_before.0 && programs_after.1 != programs_before.1,
        "the programs were not replaced: {programs_before:?} before, {programs_after:?} after"
    );
    proof.assert_kernel_ran(&lb, "crash_adopt");

    // Each connection ends properly: the client's FIN goes to the echo
    // backend, which closes, and its FIN comes back.
    all.push(fresh);
    testkit::ends_with_fin_back(&mut all, Duration::from_secs(10), "after the new lb run").await;
    assert!(lb.all_ended(Duration::from_secs(10)).await, "connections not counted as ended: {}", lb.pinned_stats());
    eprintln!("{CONNS} connections through a SIGKILL of the supervisor and a new lb run: 0 lost, 0 bytes wrong");
}

/// On the packet plane no process of lb's carries a joined connection: 1,000
/// joined connections go on exchanging checked bytes while every lb
/// process (supervisor, workers, holders) is killed with SIGKILL and while
/// none runs. The next `lb run` adopts the flows left in the pinned maps:
/// it counts and lists every connection, and each one later ends properly
/// (the FINs each way go through the program) and is counted as ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_plane_connections_outlive_every_lb_process() {
    const CONNS: u32 = 1000;
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Packet, "crash_packet", &body) else { return };
    let proof = KernelProof::start(&lb);
    let conns = open_checked(lb.addr, CONNS).await;
    proof.await_joined(&lb, u64::from(CONNS), Duration::from_secs(10), "crash_packet").await;
    let traffic = Traffic::start(conns, 10);
    traffic_moves(&traffic, 1, "before the kill").await;

    let everyone = lb.pids();
    lb.kill_supervisor();
    for p in &everyone {
        kill(*p, libc::SIGKILL);
    }
    all_gone(&everyone, "lb's processes").await;
    traffic_moves(&traffic, 2, "while no lb process ran").await;

    lb.restart("crash_packet", &[]);
    traffic_moves(&traffic, 2, "after lb run again").await;
    let Finished { conns: mut all, errors } = traffic.finish().await;
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    lb.assert_joined_live(u64::from(CONNS), "after the restart").await;
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 5000, 0).await.unwrap_or_else(|e| panic!("a new client after the restart: {e}"));
    all.push(fresh);
    testkit::ends_with_fin_back(&mut all, Duration::from_secs(10), "after the new lb run").await;
    assert!(lb.all_ended(Duration::from_secs(10)).await, "connections not counted as ended: {}", lb.pinned_stats());
    eprintln!("{CONNS} joined connections through a SIGKILL of every lb process and a new lb run: 0 lost");
}

/// With no restart, the holders of a killed supervisor keep splicing and
/// forward ends; once the last connection has ended they exit by
/// themselves and their listeners close; `lb stop` then removes the pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_supervisor_connections_work_and_end_and_the_holders_follow() {
    const CONNS: u32 = 100;
    let be = Backend::echo().await;
    let Some(mut lb) = Lb::start(Mode::Kernel, "crash_orphan", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    let conns = open_checked(lb.addr, CONNS).await;
    proof.assert_all_spliced(&lb, "crash_orphan");
    let holders = lb.holders.clone();
    lb.kill_supervisor();
    let traffic = Traffic::start(conns, 4);
    traffic_moves(&traffic, 3, "while the supervisor was dead").await;
    let Finished { conns: mut all, errors } = traffic.finish().await;
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    // Half end with a FIN from the client: forwarded both ways with no supervisor.
    let rest = all.split_off(all.len() / 2);
    testkit::ends_with_fin_back(&mut all, Duration::from_secs(10), "without a supervisor").await;
    assert!(holders.iter().all(|p| testkit::alive(*p)), "the holder left while it still had connections");
    // The other half still answers, then is closed.
    let mut rest = rest;
    for (i, s) in rest.iter_mut().enumerate() {
        round_trip(s, 9000 + i as u32, 0).await.unwrap_or_else(|e| panic!("connection {i} of the second half: {e}"));
    }
    drop(rest);
    all_gone(&holders, "holders with no connection left").await;
    assert!(
        lb.stderr().contains("the last connection has ended"),
        "the holder did not say why it left:\n{}",
        lb.stderr()
    );
    // The listener closes with the holder's last thread (its main one may
    // already show as gone).
    let addr = lb.addr;
    let closed = retry_until(Duration::from_secs(5), || {
        let refused = std::thread::spawn(move || std::net::TcpStream::connect(addr).is_err());
        refused.join().unwrap_or(false).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the frontend still accepts with no lb process left");
    let (ok, out, err) = lb.cli(&["stop"]);
    assert!(ok && out.contains("removed the pins"), "lb stop: {out} {err}");
    assert!(!lb.pin_path.exists(), "lb stop left the pins");
}

/// `lb stop` ends the holders a killed supervisor left (their connections
/// are closed) and removes the pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_stop_ends_the_holders_of_a_dead_supervisor() {
    let be = Backend::echo().await;
    let Some(mut lb) = Lb::start(Mode::Kernel, "crash_stop", &[be.addr]) else { return };
    let mut clients = open_checked(lb.addr, 20).await;
    let holders = lb.holders.clone();
    lb.kill_supervisor();
    round_trip(&mut clients[0], 0, 1).await.unwrap_or_else(|e| panic!("a connection without a supervisor: {e}"));
    let (ok, out, err) = lb.cli(&["stop"]);
    assert!(ok, "lb stop failed: {err}");
    assert!(out.contains("stopped 1 holder(s)") && out.contains("removed the pins"), "lb stop said: {out}");
    all_gone(&holders, "holders after lb stop").await;
    for (i, s) in clients.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "connection {i} still open after lb stop: {r:?}");
    }
    assert!(!lb.pin_path.exists(), "lb stop left the pins");
    let (ok, _, err) = lb.cli(&["stop"]);
    assert!(!ok && err.contains("nothing runs"), "lb stop with nothing there: {err}");
}

/// A binary built for other maps does not take a killed supervisor's
/// holders over: it says why, closes their connections, and starts anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_run_refuses_to_take_over_maps_of_another_layout() {
    let be = Backend::echo().await;
    let Some(mut lb) = Lb::start(Mode::Kernel, "crash_layout", &[be.addr]) else { return };
    let mut clients = open_checked(lb.addr, 20).await;
    let holders = lb.holders.clone();
    lb.kill_supervisor();
    lb.restart("crash_layout", &[("LB_TEST_PRETEND_LAYOUT", " LB_NEW:8/8")]);
    let log = lb.stderr();
    assert!(
        log.contains("cannot take them over: its maps are laid out differently") && log.contains("starting anew"),
        "no clear refusal in the log:\n{log}"
    );
    all_gone(&holders, "the refused holders").await;
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(b"x").await.ok();
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "connection {i} of the refused instance still answers: {r:?}");
    }
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut fresh, 1, 0).await.unwrap_or_else(|e| panic!("a new client of the new instance: {e}"));
    // Counters start from zero: new pins.
    let fresh_pins = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["totals"]["accepted"].as_u64() == Some(1)).then_some(())
    })
    .await;
    assert!(fresh_pins.is_some(), "the pins were not replaced: {}", lb.pinned_stats());
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until `text` appears in lb's log.
async fn logged(lb: &Lb, text: &str, within: Duration) {
    let seen = retry_until(within, || lb.stderr().contains(text).then_some(())).await;
    assert!(seen.is_some(), "{text:?} not logged within {within:?}:\n{}", lb.stderr());
}

/// The holders `lb run` took over after a crash are its own children
/// like any: one that hangs (SIGSTOP) is found by its heartbeat, killed
/// and replaced, one that is killed is restarted, and the slots serve
/// again while the other slot's connections go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_taken_over_after_a_crash_are_watched_and_restarted() {
    let be = Backend::echo().await;
    let body = format!("workers = 2\n[timeouts]\nworker = \"1s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Kernel, "crash_watch", &body) else { return };
    let mut conns = open_checked(lb.addr, 20).await;
    lb.kill_supervisor();
    lb.restart("crash_watch", &[]);
    logged(&lb, "slot 1: took over", Duration::from_secs(5)).await;
    let (hung, killed) = (lb.holders[0], lb.holders[1]);
    kill(hung, libc::SIGSTOP);
    let text = format!("holder 0 (pid {hung}): no heartbeat for 1s (timeouts.worker) and no CPU time since: hung");
    logged(&lb, &text, Duration::from_secs(10)).await;
    logged(&lb, "holder 0 restarted as pid", Duration::from_secs(10)).await;
    logged(&lb, "worker 0 restarted as pid", Duration::from_secs(15)).await;
    assert!(!testkit::alive(hung), "the hung holder still runs");
    // Slot 1's connections (taken over) went on meanwhile.
    let rows: serde_json::Value = serde_json::from_str(&lb.ctl(&["conns", "--json"])).unwrap();
    let slot1: Vec<String> = rows
        .as_array()
        .expect("lb conns --json is a list")
        .iter()
        .filter(|r| r["worker"].as_u64() == Some(1))
        .filter_map(|r| r["client"].as_str().map(str::to_owned))
        .collect();
    assert!(!slot1.is_empty(), "no connection of slot 1 left: {rows}");
    for (i, s) in conns.iter_mut().enumerate() {
        if slot1.contains(&s.local_addr().unwrap().to_string()) {
            round_trip(s, i as u32, 1).await.unwrap_or_else(|e| panic!("slot 1's connection {i}: {e}"));
        }
    }
    kill(killed, libc::SIGKILL);
    logged(&lb, &format!("holder 1 (pid {killed}) was killed by signal 9"), Duration::from_secs(5)).await;
    logged(&lb, "holder 1 restarted as pid", Duration::from_secs(10)).await;
    logged(&lb, "worker 1 restarted as pid", Duration::from_secs(15)).await;
    for i in 0..20 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        round_trip(&mut s, 100 + i, 0).await.unwrap_or_else(|e| panic!("new client {i} after the restarts: {e}"));
    }
}

/// `lb stop` after the holders of a dead supervisor were killed too (they
/// could not clean up) removes what they left beside the pins: each
/// slot's socket, lock and heartbeat file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_stop_removes_the_files_of_killed_holders() {
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Kernel, "crash_files", &body) else { return };
    let files: Vec<std::path::PathBuf> = (0..2u16)
        .flat_map(|i| {
            let (dir, pins) = (&lb.run_dir, &lb.pin_path);
            use lb_common::files::{holder_beat, holder_lock, holder_socket};
            [holder_socket(dir, pins, i), holder_lock(dir, pins, i), holder_beat(dir, pins, i)]
        })
        .collect();
    let missing: Vec<_> = files.iter().filter(|f| !f.exists()).collect();
    assert!(missing.is_empty(), "the holders have no {missing:?}");
    let holders = lb.holders.clone();
    lb.kill_supervisor();
    for p in &holders {
        kill(*p, libc::SIGKILL);
    }
    all_gone(&holders, "killed holders").await;
    let (ok, out, err) = lb.cli(&["stop"]);
    assert!(ok && out.contains("removed the pins"), "lb stop: {out} {err}");
    let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "lb stop left {left:?}");
}

/// The takeover after a crash is an upgrade's hand-over, commit step
/// included: with the old holder's commit late (a test hook in the holders
/// the killed supervisor started), the new holder touches nothing and
/// exits, and the old one resumes alone; `lb run` then stops it (closing its
/// connections, and saying so) and starts the slot anew, which serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_whose_commit_comes_late_leaves_one_holder_then_starts_anew() {
    let test = "crash_late_commit";
    if !testkit::lbproc::kernel_available(test) {
        return;
    }
    let be = Backend::echo().await;
    let (dir, pin_path) = testkit::lbproc::scratch();
    let cfg = format!("dataplane = \"kernel\"\npin_path = \"{}\"\n{}", pin_path.display(), Lb::body(&[be.addr]));
    let env = [("LB_TEST_HANDOVER_FAULT", "late-commit"), ("LB_TEST_HANDOVER_STEP_MS", "1000")];
    let mut lb = Lb::launch_with(test, dir, pin_path, &cfg, &env);
    let mut conns = open_checked(lb.addr, 20).await;
    let old = lb.holders[0];
    lb.kill_supervisor();
    // The new holder waits for the commit as long as the old one.
    lb.restart(test, &env[1..]);
    let log = lb.stderr();
    assert!(log.contains("this holder touched nothing"), "the new holder did not wait for the commit:\n{log}");
    let failed = format!("slot 0: taking over the earlier holder (pid {old}) failed");
    assert!(log.contains(&failed) && log.contains("starting a new one"), "no clear account in the log:\n{log}");
    all_gone(&[old], "the old holder").await;
    assert_ne!(lb.holders[0], old);
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(b"x").await.ok();
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "connection {i} of the stopped holder still answers: {r:?}");
    }
    for i in 0..10 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        round_trip(&mut s, 100 + i, 0).await.unwrap_or_else(|e| panic!("new client {i} after the takeover: {e}"));
    }
}
