//! Connections outlive the processes that made them: spliced connections
//! are kept by each worker slot's holder, so killing the workers (the
//! processes that accept, choose and connect) loses none of them.

use std::time::{Duration, Instant};

use testkit::{
    KernelProof, Lb, Mode,
    backends::Backend,
    retry_until, round_trip,
    traffic::{Finished, Traffic, expect_replies_after_fin, open_checked},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn worker_pid(lb: &Lb, index: u64) -> Option<u64> {
    let s = lb.pinned_stats();
    s["workers"].as_array()?.iter().find(|w| w["worker"] == index).and_then(|w| w["pid"].as_u64())
}

/// 1,000 spliced connections carry checked bytes while every worker is
/// killed with SIGKILL in turn: none is lost, no byte is wrong, new clients
/// are served again within 1 s of each restart, and the counts agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_worker_loses_no_spliced_connection() {
    const CONNS: u32 = 1000;
    const TASKS: usize = 10;
    let be = Backend::echo().await;
    let body = format!("workers = 2\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "holder_kill", &body) else { return };
    assert_eq!(lb.holders.len(), 2, "one holder per worker slot: {:?}", lb.holders);
    // The OOM killer takes a worker (nothing lost) before a holder.
    let score =
        |p: u32| std::fs::read_to_string(format!("/proc/{p}/oom_score_adj")).unwrap().trim().parse::<i32>().unwrap();
    assert!(lb.workers.iter().all(|w| score(*w) > score(lb.holders[0])), "workers must be the OOM killer's first pick");
    let proof = KernelProof::start(&lb);
    let addr = lb.addr;
    let conns = open_checked(addr, CONNS).await;
    proof.assert_all_spliced(&lb, "holder_kill");
    // Traffic the whole time: TASKS tasks, each round-tripping its share in turn.
    let traffic = Traffic::start(conns, TASKS);
    let mut extra = Vec::new();
    for index in 0..2u64 {
        let victim = worker_pid(&lb, index).expect("worker in stats");
        let before = traffic.rounds();
        // SAFETY: signalling a process of the lb this test started.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let killed = Instant::now();
        // A client arriving while the worker is gone waits in the holder's
        // backlog (or goes to the other slot) and is served.
        let mut early = TcpStream::connect(addr).await.expect("connect while a worker is dead");
        round_trip(&mut early, 5000 + index as u32, 0)
            .await
            .unwrap_or_else(|e| panic!("client during the restart: {e}"));
        let restarted = retry_until(Duration::from_secs(10), || worker_pid(&lb, index).filter(|p| *p != victim)).await;
        let restarted_at = Instant::now();
        assert!(restarted.is_some(), "worker {index} not restarted: {}", lb.pinned_stats());
        let mut fresh = TcpStream::connect(addr).await.expect("connect after the restart");
        round_trip(&mut fresh, 6000 + index as u32, 0)
            .await
            .unwrap_or_else(|e| panic!("client after the restart: {e}"));
        let served = restarted_at.elapsed();
        extra.extend([early, fresh]);
        assert!(served < Duration::from_secs(1), "a new client took {served:?} after worker {index} restarted");
        eprintln!(
            "worker {index} (pid {victim}) killed; restarted after {:?}, a new client served {served:?} later",
            restarted_at - killed
        );
        // Traffic went on across the kill.
        let moved =
            retry_until(Duration::from_secs(10), || (traffic.rounds() >= before + 2 * traffic.tasks()).then_some(()))
                .await;
        assert!(moved.is_some(), "traffic stopped after worker {index} was killed");
    }
    let rounds = traffic.rounds() / traffic.tasks();
    let Finished { conns: mut all, errors } = traffic.finish().await;
    assert!(errors.is_empty(), "{} failed round trip(s), first: {:?}", errors.len(), errors.first());
    // Every connection is still there.
    for (i, s) in all.iter_mut().enumerate() {
        round_trip(s, i as u32, u32::MAX).await.unwrap_or_else(|e| panic!("connection {i} after the kills: {e}"));
    }
    // The restarted workers count the connections they took over.
    let want = u64::from(CONNS) + extra.len() as u64 - 4;
    let counted = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let active = s["totals"]["active"].as_u64()?;
        let entries = s["counters"]["conn_entries"].as_u64()?;
        (active == want + 4 && entries == 2 * (want + 4)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "want {} active connections after the kills: {}", want + 4, lb.pinned_stats());
    proof.assert_kernel_ran(&lb, "holder_kill");
    eprintln!("{CONNS} connections, ~{rounds} checked rounds each, 2 workers killed: 0 lost, 0 bytes wrong");
}

/// A FIN sent while the worker is dead reaches the backend, and the
/// backend's reply and FIN reach the client: ends are forwarded by the
/// holder, not by the process that accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_while_the_worker_is_dead_is_forwarded() {
    let be = Backend::echo_after_eof().await;
    let Some(lb) = Lb::start(Mode::Kernel, "holder_fin", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    let holder = lb.holders[0];
    let holder_fds = testkit::fd_count(holder);
    let mut clients = Vec::new();
    for i in 0..20u8 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[i; 100]).await.unwrap();
        clients.push(s);
    }
    // The backend answers only after EOF: wait until the kernel carried
    // every client's 100 bytes (all spliced) and the holder has all 40 sockets.
    let redirected = |lb: &Lb| lb.pinned_stats()["counters"]["bytes_redirected"].as_u64().unwrap_or(0);
    let held = || testkit::fd_count(holder) >= holder_fds + 40;
    let ready = retry_until(Duration::from_secs(5), || (redirected(&lb) >= 2000 && held()).then_some(())).await;
    assert!(ready.is_some(), "the clients' connections were not spliced and held: {}", lb.pinned_stats());
    proof.assert_all_spliced(&lb, "holder_fin");
    let victim = lb.worker();
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let t0 = Instant::now();
    for s in &mut clients {
        s.shutdown().await.unwrap();
    }
    expect_replies_after_fin(&mut clients).await;
    eprintln!("20 FINs sent right after the worker was killed: all forwarded, replies back in {:?}", t0.elapsed());
    let gone = retry_until(Duration::from_secs(5), || {
        (lb.pinned_stats()["counters"]["conn_entries"].as_u64() == Some(0)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "records of closed connections remain: {}", lb.pinned_stats());
    proof.assert_kernel_ran(&lb, "holder_fin");
}

/// A killed holder takes its slot's connections with it (said plainly in
/// the log), and the slot serves new clients again: the supervisor starts
/// a new holder, and the slot's worker restarts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_and_the_slot_serves_again() {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start(Mode::Kernel, "holder_killed", &[be.addr]) else { return };
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    round_trip(&mut s, 1, 0).await.unwrap();
    let victim = lb.holders[0];
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    // Its connection is gone with it: the client sees the end.
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "the killed holder's connection still answers: {r:?}");
    let logged = retry_until(Duration::from_secs(5), || {
        lb.stderr()
            .contains(&format!("holder 0 (pid {victim}) was killed by signal 9: the connections it held are lost"))
            .then_some(())
    })
    .await;
    assert!(logged.is_some(), "the supervisor did not say what was lost:\n{}", lb.stderr());
    // New clients are served again once the slot is back.
    let served = retry_until(Duration::from_secs(15), || {
        let addr = lb.addr;
        let h = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut c = TcpStream::connect(addr).await.ok()?;
                round_trip(&mut c, 2, 0).await.ok()
            })
        });
        h.join().ok().flatten()
    })
    .await;
    assert!(served.is_some(), "no client served after the holder was replaced:\n{}", lb.stderr());
}

/// A client that sends its request and FIN before lb splices it (here:
/// lb waits for its first byte, so both are in before the server is even
/// chosen) still outlives the worker: the kernel made it a redirect target
/// at its accept, so the server's side is spliced and the holder copies the
/// client's finished side; the worker killed after the hand-over costs
/// nothing. (Before `lb_setup`, such a connection could not be spliced at
/// all and was copied by the worker, which took it down with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closed_before_its_splice_outlives_the_worker() {
    const CONNS: usize = 20;
    let (got_eof, mut eofs) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (reply, go) = tokio::sync::watch::channel(false);
    let be = Backend::spawn(move |mut s| {
        let (got_eof, mut go) = (got_eof.clone(), go.clone());
        async move {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let _ = got_eof.send(());
            let _ = go.wait_for(|go| *go).await;
            let _ = s.write_all(&got).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let body = format!(
        "[[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\nfirst_byte_timeout = \"5s\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(Mode::Kernel, "closed_before_splice", &body) else { return };
    let proof = KernelProof::start(&lb);
    let mut clients = Vec::new();
    for i in 0..CONNS {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[i as u8; 100]).await.unwrap();
        s.shutdown().await.unwrap();
        clients.push(s);
    }
    // Every request and FIN reached the backend: each connection is with
    // the holder (its client side copied there, its server side spliced).
    for i in 0..CONNS {
        let e = tokio::time::timeout(Duration::from_secs(5), eofs.recv()).await;
        assert!(matches!(e, Ok(Some(()))), "only {i} of {CONNS} requests and FINs reached the backend");
    }
    assert_eq!(proof.kernel_setups(&lb), CONNS as u64, "lb_setup did not set up every connection");
    let victim = lb.worker();
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    reply.send_replace(true);
    for (i, s) in clients.iter_mut().enumerate() {
        let mut back = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await;
        assert!(matches!(r, Ok(Ok(100))), "client {i}: the reply after the worker was killed: {r:?}");
        assert_eq!(back, [i as u8; 100], "client {i}: wrong reply");
    }
    proof.assert_kernel_ran(&lb, "closed_before_splice");
}
