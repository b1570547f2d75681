//! The data-path suite, run against both data planes and against the kernel
//! plane with the client side copied by the close watcher (the path a client
//! that closes during the splice takes). Kernel variants need root and
//! bpffs, and prove from the pinned maps that the verdict carried their bytes.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use testkit::{
    KernelProof, Lb, Mode,
    backends::{self, Backend},
    retry_until,
    stream::{Rng, Stream},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MIB: u64 = 1 << 20;

testkit::every_path!(
    transfers_200_random_sizes_both_ways,
    client_first_200_at_t0,
    server_first_200_banner_at_accept,
    half_close_request_then_reply,
    backend_reset_reaches_client_within_1s,
    vanishing_client_reaches_backend_within_1s,
    connect_close_10k_leaks_nothing,
    send_buffer_is_set_on_both_sockets,
    slow_reader_after_server_fin_is_waited_for_quietly,
);

/// What the pinned maps must show after a test on `mode`: on the kernel
/// plane every connection spliced; with the client side copied, the
/// server's bytes (if it sent any) still redirected by the verdict.
fn prove(proof: &KernelProof, lb: &Lb, mode: Mode, test: &str, server_sends: bool) {
    match mode {
        Mode::Kernel | Mode::KernelUserSetup | Mode::Packet => proof.assert_all_spliced(lb, test),
        Mode::KernelCopyClient if server_sends => {
            proof.assert_kernel_ran(lb, test);
        }
        Mode::KernelCopyClient | Mode::Userspace => {}
    }
}

/// Bytes and skbs the kernel moved: the sockmap verdict's, plus the
/// payload the packet plane's program rewrote (its packets as skbs).
fn counters(lb: &Lb) -> (u64, u64) {
    let s = lb.pinned_stats();
    let packet = |k: &str| s["packet"][k].as_u64().unwrap_or(0);
    (
        s["counters"]["bytes_redirected"].as_u64().unwrap() + packet("bytes"),
        s["counters"]["skbs_redirected"].as_u64().unwrap() + packet("rewritten"),
    )
}

async fn transfers_200_random_sizes_both_ways(mode: Mode) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let be = Backend::transfer(reports.clone()).await;
    let Some(lb) = Lb::start(mode, "transfers_200", &[be.addr]) else { return };
    let mut rng = Rng::new(0x5eed);
    // Both ends of the range are always in: empty and 64 MiB, each direction.
    let mut sizes = vec![(0, 0), (64 * MIB, 0), (0, 64 * MIB), (64 * MIB, 64 * MIB)];
    while sizes.len() < 200 {
        sizes.push((rng.size(64 * MIB), rng.size(64 * MIB)));
    }
    let total: u64 = sizes.iter().map(|(u, d)| u + d + 24).sum();
    let before = if mode.is_kernel() { counters(&lb).0 } else { 0 };
    let proof = KernelProof::start(&lb);
    let tasks: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(up, down))| tokio::spawn(backends::transfer(lb.addr, 1000 + i as u64, up, down)))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap_or_else(|e| panic!("client: {e}"));
    }
    let reps = retry_until(Duration::from_secs(5), || {
        let r = reports.lock().unwrap();
        (r.len() == 200).then(|| r.clone())
    })
    .await
    .expect("backend saw all 200 transfers end");
    for r in &reps {
        assert!(r.up_intact && r.error.is_none(), "upload corrupt at the backend: {r:?}");
    }
    eprintln!("[{}] 200 transfers, {} MiB checked byte by byte", mode.as_str(), total / MIB);
    if mode.is_kernel() {
        // sockmap takes only ESTABLISHED sockets. A side that sends all of
        // its bytes and its FIN before lb splices (an empty upload, a small
        // download) is served by lb's userspace copy instead. Neither side of
        // a transfer of 16 MiB or more each way can finish that early (socket
        // buffers are smaller), so those bytes must all cross the kernel:
        // both directions, or the downloads alone when the client side is
        // copied in userspace.
        let must_cross: u64 = sizes
            .iter()
            .filter(|(u, d)| *u >= 16 * MIB && *d >= 16 * MIB)
            .map(|(u, d)| if mode == Mode::KernelCopyClient { *d } else { u + d + 24 })
            .sum();
        assert!(must_cross >= 128 * MIB, "the size mix lost its large transfers");
        let moved = counters(&lb).0 - before;
        assert!(
            moved >= must_cross,
            "kernel redirected {moved} bytes, fewer than the {must_cross} that had to cross it"
        );
    }
    if mode == Mode::Packet {
        let joined = proof.joined(&lb);
        assert!(joined > 0, "no transfer was joined on the packet plane");
        eprintln!("[packet] 200 transfers: {joined} joined");
    }
}

async fn client_first_200_at_t0(mode: Mode) {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start(mode, "client_first", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let addr = lb.addr;
            tokio::spawn(async move {
                let mut msg = vec![0u8; 100 + i as usize];
                Stream::new(i).fill(&mut msg);
                let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect: {e}"));
                // Written at t=0: before lb has even connected to the backend.
                s.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                    .await
                    .unwrap_or_else(|_| panic!("client {i}: early data stalled (no echo within 5 s)"))
                    .unwrap_or_else(|e| panic!("client {i}: {e}"));
                assert_eq!(back, msg, "client {i}: echo differs");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    prove(&proof, &lb, mode, "client_first", true);
}

async fn server_first_200_banner_at_accept(mode: Mode) {
    const BANNER: &[u8] = b"220 lb-test ready\r\n";
    let be = Backend::banner(BANNER).await;
    let Some(lb) = Lb::start(mode, "server_first", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let addr = lb.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect: {e}"));
                let mut got = vec![0u8; BANNER.len()];
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
                    .await
                    .unwrap_or_else(|_| panic!("client {i}: banner stalled (none within 5 s)"))
                    .unwrap_or_else(|e| panic!("client {i}: {e}"));
                assert_eq!(got, BANNER);
                s.write_all(b"QUIT\r\n").await.unwrap();
                let mut back = [0u8; 6];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"QUIT\r\n");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    prove(&proof, &lb, mode, "server_first", true);
}

async fn half_close_request_then_reply(mode: Mode) {
    const REQ: u64 = 300_000;
    const REPLY: usize = 1 << 20;
    let be = Backend::read_then_reply(REPLY).await;
    let Some(lb) = Lb::start(mode, "half_close", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    for round in 0..20 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        backends::write_stream(&mut s, round, REQ).await.unwrap();
        // Half-close: the backend only answers after it has seen our EOF.
        s.shutdown().await.unwrap();
        let (n, ok) =
            tokio::time::timeout(Duration::from_secs(10), backends::read_and_check(&mut s, REQ, REPLY as u64))
                .await
                .unwrap_or_else(|_| panic!("round {round}: reply not complete within 10 s (EOF not forwarded?)"))
                .unwrap();
        assert!(ok, "round {round}: reply corrupt or short: {n} of {REPLY} bytes");
    }
    prove(&proof, &lb, mode, "half_close", true);
}

async fn backend_reset_reaches_client_within_1s(mode: Mode) {
    let be = Backend::reset_after_first_byte().await;
    let Some(lb) = Lb::start(mode, "backend_reset", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    for _ in 0..20 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
            .await
            .expect("client did not see the backend's reset within 1 s");
        // lb forwards a reset as a reset: never as a clean EOF.
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the backend's reset, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
    if matches!(mode, Mode::Kernel | Mode::KernelUserSetup) {
        proof.assert_kernel_ran(&lb, "backend_reset");
    }
}

async fn vanishing_client_reaches_backend_within_1s(mode: Mode) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, Instant)>();
    let be = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.unwrap();
            let _ = tx.send(("hello", Instant::now()));
            let mut buf = [0u8; 64];
            let r = s.read(&mut buf).await;
            let what = match r {
                Ok(0) => "eof",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                _ => "data",
            };
            let _ = tx.send((what, Instant::now()));
        }
    })
    .await;
    let Some(lb) = Lb::start(mode, "vanishing_client", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    for abortive in [false, true, false, true] {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let (what, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(what, "hello");
        if abortive {
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        }
        let t0 = Instant::now();
        drop(s);
        let (what, at) = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("backend saw nothing within 1 s of the client vanishing (abortive: {abortive})"))
            .unwrap();
        assert!(what == "eof" || what == "reset", "backend saw {what}");
        assert!(at - t0 < Duration::from_secs(1));
    }
    prove(&proof, &lb, mode, "vanishing_client", false);
}

async fn connect_close_10k_leaks_nothing(mode: Mode) {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start(mode, "connect_close_10k", &[be.addr]) else { return };
    let proof = KernelProof::start(&lb);
    // The worker accepts and connects, its holder keeps the spliced sockets.
    let fds = |lb: &Lb| lb.slot0().into_iter().map(testkit::fd_count).sum::<usize>();
    let fds0 = fds(&lb);
    let addr = lb.addr;
    let workers: Vec<_> = (0..50u64)
        .map(|w| {
            tokio::spawn(async move {
                for i in 0..200u64 {
                    let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {w}/{i}: {e}"));
                    s.write_all(&[w as u8]).await.unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.unwrap_or_else(|e| panic!("echo {w}/{i}: {e}"));
                    assert_eq!(b[0], w as u8);
                    if i % 2 == 0 {
                        s.shutdown().await.unwrap();
                        let mut rest = Vec::new();
                        s.read_to_end(&mut rest).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let settled = retry_until(Duration::from_secs(10), || (fds(&lb) <= fds0).then_some(())).await;
    assert!(settled.is_some(), "lb holds {} fds after 10,000 closed connections (started with {fds0})", fds(&lb));
    if mode.is_kernel() {
        let empty = retry_until(Duration::from_secs(5), || {
            let s = lb.pinned_stats();
            (s["counters"]["spliced_sockets"] == 0
                && s["counters"]["target_entries"] == 0
                && s["counters"]["conn_entries"] == 0)
                .then_some(())
        })
        .await;
        assert!(empty.is_some(), "kernel maps not empty after all connections closed: {}", lb.pinned_stats());
    }
    // Each client closes only after its echo came back through lb, so
    // every connection was spliced before either side could close.
    if matches!(mode, Mode::Kernel | Mode::KernelUserSetup) {
        proof.assert_all_spliced(&lb, "connect_close_10k");
        assert!(proof.assert_kernel_ran(&lb, "connect_close_10k") >= 20_000, "fewer skbs redirected than bytes sent");
    } else {
        proof.assert_kernel_ran(&lb, "connect_close_10k");
    }
    // Who spliced the server sockets: the sock_ops program, at ESTABLISHED,
    // for every connection; without it, the workers for all.
    let setups = proof.kernel_setups(&lb);
    match mode {
        Mode::Kernel | Mode::KernelCopyClient | Mode::Packet => {
            assert!(setups >= 10_000, "the sock_ops program set up {setups} of 10,000 connections")
        }
        Mode::KernelUserSetup => assert_eq!(setups, 0, "the sock_ops program ran, although not attached"),
        Mode::Userspace => {}
    }
}

/// `send_buffer` reaches lb's two sockets of a connection: the client's
/// through its listener, the server's at connect (`ss` shows the kernel's
/// doubled figure as `tb`); unset, the default 8 MiB does. On the packet
/// plane lb has no socket left once the connection is joined: `ss` shows
/// none, and the connection goes on.
async fn send_buffer_is_set_on_both_sockets(mode: Mode) {
    let be = Backend::echo().await;
    for (key, tb) in [("send_buffer = \"1MiB\"\n", 2 * MIB), ("", 16 * MIB)] {
        let body = format!("{key}{}", Lb::body(&[be.addr]));
        let Some(lb) = Lb::start_with(mode, "send_buffer", &body) else { return };
        let proof = KernelProof::start(&lb);
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        if mode == Mode::Packet {
            let me = s.local_addr().unwrap().to_string();
            let lb_side = || {
                let ss = std::process::Command::new("ss").args(["-tnH", "state", "established"]).output().unwrap();
                String::from_utf8_lossy(&ss.stdout)
                    .lines()
                    .filter(|l| l.split_whitespace().nth(3) == Some(me.as_str()))
                    .count()
            };
            let gone = retry_until(Duration::from_secs(5), || (lb_side() == 0).then_some(())).await;
            assert!(gone.is_some(), "lb still has a socket for client {me} after the join");
            assert_eq!(proof.joined(&lb), 1, "the connection was not joined");
            s.write_all(b"pong").await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"pong", "the joined connection echoes");
            prove(&proof, &lb, mode, "send_buffer", true);
            continue;
        }
        let ss = std::process::Command::new("ss").args(["-tmnH", "state", "established"]).output().unwrap();
        let text = String::from_utf8_lossy(&ss.stdout).replace("\n\t", " ");
        // Columns: Recv-Q Send-Q Local Peer skmem:(…,tb<bytes>,…).
        let tb_of = |local: Option<String>, peer: String| -> Vec<Option<u64>> {
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|w| w.len() > 4 && local.as_deref().is_none_or(|a| w[2] == a) && w[3] == peer)
                .map(|w| w[4].split("tb").nth(1).and_then(|t| t.split(',').next()?.parse::<u64>().ok()))
                .collect()
        };
        let client = tb_of(Some(lb.addr.to_string()), s.local_addr().unwrap().to_string());
        assert_eq!(client, vec![Some(tb)], "{key:?}: lb's client socket in ss:\n{text}");
        let server = tb_of(None, be.addr.to_string());
        assert_eq!(server, vec![Some(tb)], "{key:?}: lb's server socket in ss:\n{text}");
        prove(&proof, &lb, mode, "send_buffer", true);
    }
}

/// The server sends 256 KiB and closes; the client, with a small receive
/// buffer, reads nothing for a while, so the server's FIN waits in lb for
/// bytes the client has not made room for (with `send_buffer` at its
/// least). lb waits without busy polling (it used to look every
/// millisecond), and the client gets every byte, then the EOF.
async fn slow_reader_after_server_fin_is_waited_for_quietly(mode: Mode) {
    const LEN: u64 = 256 * 1024;
    let be = Backend::spawn(|mut s| async move {
        let _ = backends::write_stream(&mut s, 9, LEN).await;
        // Dropped: the FIN right behind the bytes.
    })
    .await;
    let body = format!("send_buffer = \"64KiB\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(mode, "slow_reader_fin", &body) else { return };
    let proof = KernelProof::start(&lb);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(lb.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    testkit::assert_quiet(&lb.pids(), "a server's FIN waiting for a slow reader").await;
    let (n, ok) = tokio::time::timeout(Duration::from_secs(10), backends::read_and_check(&mut s, 9, LEN))
        .await
        .expect("the client got the bytes and the EOF within 10 s")
        .unwrap();
    assert!(ok && n == LEN, "client got {n} of {LEN} bytes, intact then EOF: {ok}");
    prove(&proof, &lb, mode, "slow_reader_fin", true);
}

/// Kernel only: userspace does no per-byte work, so lb's CPU time for 1 GiB
/// is a small fraction of the wall time, and the counter proves the path
/// (without `splice_queue_limit`, which would reset this transfer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_1gib_costs_lb_little_cpu() {
    const LEN: u64 = 1 << 30;
    let reports = Arc::new(Mutex::new(Vec::new()));
    let be = Backend::transfer(reports.clone()).await;
    // No splice_queue_limit: on loopback the sender outruns lb's send path,
    // and with the default the queue between them passes the limit long
    // before 1 GiB (a reset: README, `splice_queue_limit`).
    let body = format!("splice_queue_limit = \"0\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "kernel_1gib_cpu", &body) else { return };
    let (bytes0, _) = counters(&lb);
    let cpu_now = |lb: &Lb| lb.slot0().into_iter().map(testkit::cpu_time).sum::<Duration>();
    let cpu0 = cpu_now(&lb);
    let t0 = Instant::now();
    backends::transfer(lb.addr, 42, LEN, 0).await.unwrap_or_else(|e| panic!("{e}"));
    let wall = t0.elapsed();
    let cpu = cpu_now(&lb) - cpu0;
    let moved = counters(&lb).0 - bytes0;
    let frac = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "[kernel] 1 GiB in {:.2}s ({:.2} GiB/s): lb CPU {:.3}s = {:.1}% of wall; kernel redirected {moved} bytes",
        wall.as_secs_f64(),
        1.0 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        frac * 100.0
    );
    assert!(moved >= LEN, "redirect counter grew by {moved}, less than 1 GiB");
    assert!(frac < 0.2, "lb used {:.1}% of wall time in CPU for a spliced transfer", frac * 100.0);
}
