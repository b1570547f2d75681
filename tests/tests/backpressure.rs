//! Backpressure: a fast sender and a slow reader must not make anyone (lb or
//! the kernel on its behalf) buffer the difference. Its own binary, so that
//! no other test moves the kernel's global TCP memory figure meanwhile.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use testkit::{
    KernelProof, Lb, Mode,
    backends::{self, Backend},
    stream::Stream,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MIB: u64 = 1 << 20;

/// The kernel's TCP memory is one global figure, and each test here fills
/// socket buffers: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

testkit::both_planes!(fast_sender_slow_reader_256mib);

async fn fast_sender_slow_reader_256mib(mode: Mode) {
    let _alone = ONE_AT_A_TIME.lock().await;
    const LEN: u64 = 256 * MIB;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let be = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            // A slow reader: 256 KiB every 5 ms (~50 MiB/s).
            let mut st = Stream::new(77);
            let mut buf = vec![0u8; 256 * 1024];
            let mut scratch = Vec::new();
            let (mut total, mut ok) = (0u64, true);
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                };
                ok &= total + n as u64 <= LEN && st.check(&buf[..n], &mut scratch);
                total += n as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = tx.send((total, ok));
        }
    })
    .await;
    // No splice_queue_limit: this test measures socket buffers and lb's
    // memory; with the default limit the kernel plane resets this transfer
    // once 64 MiB wait for the slow reader (see the test below it).
    let body = format!("splice_queue_limit = \"0\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(mode, "slow_reader", &body) else { return };
    let proof = KernelProof::start(&lb);
    // The worker and its holder (which copies a side the kernel could not take).
    let kb = |lb: &Lb, field: &str| lb.slot0().into_iter().map(|p| testkit::status_kb(p, field)).sum::<u64>();
    let rss0 = kb(&lb, "VmRSS");
    let tcp0 = testkit::tcp_mem_pages();
    // Peak of the kernel's TCP memory while the transfer runs (the psock
    // backlog of a spliced socket is charged there, not to lb's RSS).
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(tcp0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(testkit::tcp_mem_pages(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let t0 = Instant::now();
    backends::write_stream(&mut s, 77, LEN).await.unwrap();
    s.shutdown().await.unwrap();
    let (total, ok) =
        tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("reader finished").unwrap();
    assert!(ok && total == LEN, "slow reader got {total} of {LEN} bytes, intact: {ok}");
    let hwm = kb(&lb, "VmHWM");
    sampler.abort();
    let tcp_peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "[{}] 256 MiB to a slow reader in {:.1}s: lb peak RSS {hwm} KiB (start {rss0} KiB); kernel TCP memory peak {} pages of 4 KiB (start {tcp0})",
        mode.as_str(),
        t0.elapsed().as_secs_f64(),
        tcp_peak
    );
    assert!(hwm < 256 * 1024, "lb peak RSS {hwm} KiB: the slow reader's backlog is being buffered in lb");
    // Socket buffers on both sides are a few MiB each; without backpressure
    // the kernel plane queued most of the 256 MiB (89,842 pages).
    let grew = tcp_peak.saturating_sub(tcp0);
    assert!(grew < 16 * 1024, "kernel TCP memory grew by {grew} pages (64 MiB allowed): no backpressure");
    proof.assert_all_spliced(&lb, "slow_reader");
}

/// Kernel only, with the configuration's defaults: a backend that reads
/// nothing must not make the kernel queue what its client keeps sending
/// (the verdict takes it off the client's socket at once; without a bound a
/// client got 2.3 GB in within 3 s). `splice_queue_limit` is on by default,
/// at a quarter of `kernel_memory` (64 MiB of the default 256 MiB): the
/// client is reset soon after that much waits. The client stops at 512 MiB
/// (what lb without a default bound would take in well under a second), so
/// that a failing run does not take gigabytes of the machine's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_bounds_what_the_kernel_queues() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const LIMIT: u64 = 64 * MIB;
    let be = Backend::spawn(|s| async move {
        // Reads nothing while the client sends.
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(s);
    })
    .await;
    let Some(lb) = Lb::start(Mode::Kernel, "queue_default", &[be.addr]) else { return };
    let check = std::process::Command::new(testkit::lbproc::lb_bin())
        .args(["check", "--config"])
        .arg(lb.config_path())
        .output()
        .expect("lb check");
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(check.contains("splice_queue_limit = \"64MiB\""), "lb check:\n{check}");
    let proof = KernelProof::start(&lb);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let (sent, failed) = write_until_fails(&mut s, 94, 1 << 20, Duration::from_secs(10), 512 * MIB).await;
    eprintln!("[kernel] queue_default: the client wrote {sent} bytes, then: {failed:?}");
    assert!(
        matches!(failed, Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
        "the client was not reset ({sent} bytes in): {failed:?}"
    );
    // The limit, the event step (a quarter of it), and socket buffers (the
    // client's, lb's two sides with the default 8 MiB send buffer, the
    // backend's receive buffer).
    assert!(sent < LIMIT + LIMIT / 4 + 48 * MIB, "the client got {sent} bytes in before the reset");
    assert!(lb.stderr().contains("splice_queue_limit 67108864"), "no warning about the reset:\n{}", lb.stderr());
    proof.assert_all_spliced(&lb, "queue_default");
}

/// Kernel only, `splice_queue_limit`: a backend that reads nothing must not
/// make the kernel queue what its client keeps sending. The verdict takes
/// bytes off the client's socket as they come, so without a limit the
/// peer's psock queue takes everything (2.3 GB in 3 s, measured); with one,
/// the holder resets the connection once more than the limit waits, and both
/// ends see the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_queue_past_the_limit_resets_the_connection() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const LIMIT: u64 = 4 * MIB;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let be = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            // Read nothing until the client is done, then see how it ended.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut buf = vec![0u8; 1 << 20];
            let end = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break "EOF".to_string(),
                    Ok(_) => {}
                    Err(e) => break e.kind().to_string(),
                }
            };
            let _ = tx.send(end);
        }
    })
    .await;
    let body = format!("splice_queue_limit = \"4MiB\"\nsend_buffer = \"1MiB\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "queue_limit", &body) else { return };
    let proof = KernelProof::start(&lb);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let (sent, failed) = write_until_fails(&mut s, 93, 256 * 1024, Duration::from_secs(3), u64::MAX).await;
    eprintln!("[kernel] queue_limit: the client wrote {sent} bytes, then: {failed:?}");
    assert!(
        matches!(failed, Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
        "the client was not reset within 3 s ({sent} bytes in): {failed:?}"
    );
    // The limit, the event step (a quarter of it), and socket buffers: the
    // client's send buffer, lb's client-side receive buffer (at most
    // tcp_rmem's 6 MiB), lb's server-side send buffer (twice 1 MiB), the
    // backend's receive buffer. Without the limit: GBs.
    assert!(sent < LIMIT + LIMIT / 4 + 24 * MIB, "the client got {sent} bytes in before the reset");
    let end = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the backend's end").unwrap();
    assert_eq!(end, std::io::ErrorKind::ConnectionReset.to_string(), "the backend's connection ended with {end}");
    let counters = lb.pinned_stats()["counters"].clone();
    assert!(counters["flow_events"].as_u64().unwrap() > 0, "no flow event: {counters}");
    proof.assert_all_spliced(&lb, "queue_limit");
}

/// Writes stream `seed` in writes of up to `chunk` bytes, for `within` or
/// until `cap` bytes are in, a write that stays blocked 100 ms not counting
/// as a failure: the bytes written, and the error that stopped the writes.
async fn write_until_fails(
    s: &mut TcpStream,
    seed: u64,
    chunk: usize,
    within: Duration,
    cap: u64,
) -> (u64, Option<std::io::ErrorKind>) {
    let mut st = Stream::new(seed);
    let mut buf = vec![0u8; chunk];
    let (mut off, mut sent) = (buf.len(), 0u64);
    let stop = Instant::now() + within;
    let mut failed = None;
    while Instant::now() < stop && failed.is_none() && sent < cap {
        if off == buf.len() {
            st.fill(&mut buf);
            off = 0;
        }
        match tokio::time::timeout(Duration::from_millis(100), s.write(&buf[off..])).await {
            Ok(Ok(n)) => {
                off += n;
                sent += n as u64;
            }
            Ok(Err(e)) => failed = Some(e.kind()),
            Err(_) => {}
        }
    }
    (sent, failed)
}
