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

testkit::both_planes!(fast_sender_slow_reader_256mib);

async fn fast_sender_slow_reader_256mib(mode: Mode) {
    // The kernel's TCP memory is one global figure: measure one plane at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
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
    let Some(lb) = Lb::start(mode, "slow_reader", &[be.addr]) else { return };
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
