//! Short exchanges: one side closes (or resets) right behind its data, so its
//! FIN or RST races lb's splice set-up. Every byte is checked, and the count
//! of failures must be 0: a client must get every byte its server sent, and
//! a reset as a reset, never a clean EOF.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use testkit::{
    KernelProof, Lb, Mode,
    backends::{self, Backend},
    external,
    stream::Stream,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

testkit::every_path!(
    ab_100k_requests_to_nginx_lose_nothing,
    server_writes_then_closes_every_size,
    client_sends_then_closes_every_size,
    backend_reset_after_request_is_a_reset_at_the_client,
);

/// Request/reply sizes, each with how many connections try it.
const SIZES: [(usize, usize); 5] = [(0, 1500), (1, 1500), (4096, 1500), (65536, 600), (1 << 20, 60)];
/// Connections in flight at once.
const CONCURRENCY: usize = 48;

fn lb_for(mode: Mode, test: &str, server: std::net::SocketAddr) -> Option<Lb> {
    Lb::start_with(mode, test, &format!("access_log = false\n{}", Lb::body(&[server])))
}

async fn ab_100k_requests_to_nginx_lose_nothing(mode: Mode) {
    let web = external::nginx_http("ok\n").unwrap_or_else(|e| panic!("{e}"));
    let Some(lb) = lb_for(mode, "ab_100k", web.addr) else { return };
    let proof = KernelProof::start(&lb);
    let url = format!("http://{}/", lb.addr);
    let r = tokio::task::spawn_blocking(move || external::ab(&url, 100_000, 64))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("[{}] ab: {r:?}", mode.as_str());
    assert_eq!(r.complete, 100_000, "{r:?}");
    assert_eq!((r.failed, r.non_2xx), (0, 0), "ab saw failed requests through lb: {r:?}");
    proof.assert_kernel_ran(&lb, "ab_100k");
    // Every connection is closed now; nothing is left to poll for. A
    // second after the last event, the close watcher sleeps until the next.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    testkit::assert_quiet(&lb.pids(), "after 100,000 short connections").await;
}

async fn server_writes_then_closes_every_size(mode: Mode) {
    for (size, count) in SIZES {
        let be = Backend::spawn(move |mut s| async move {
            let mut data = vec![0u8; size];
            Stream::new(size as u64).fill(&mut data);
            let _ = s.write_all(&data).await;
            // Dropped: FIN right behind the data.
        })
        .await;
        let Some(lb) = lb_for(mode, "server_writes_then_closes", be.addr) else { return };
        let proof = KernelProof::start(&lb);
        let failures = testkit::clients(count, CONCURRENCY, |i| {
            let addr = lb.addr;
            async move {
                let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                let (n, ok) = backends::read_and_check(&mut s, size as u64, size as u64)
                    .await
                    .map_err(|e| format!("client {i}: reading {size} bytes: {e}"))?;
                if !ok {
                    return Err(format!("client {i}: got {n} bytes, wanted exactly {size} intact, then EOF"));
                }
                Ok(())
            }
        })
        .await;
        assert!(
            failures.is_empty(),
            "size {size}: {} of {count} failed: {:?}",
            failures.len(),
            &failures[..5.min(failures.len())]
        );
        if size > 0 {
            proof.assert_kernel_ran(&lb, "server_writes_then_closes");
        }
        eprintln!("[{}] server writes {size} B then closes: {count} clients intact", mode.as_str());
    }
}

async fn client_sends_then_closes_every_size(mode: Mode) {
    for (size, count) in SIZES {
        let be = Backend::read_then_reply(size).await;
        let Some(lb) = lb_for(mode, "client_sends_then_closes", be.addr) else { return };
        let proof = KernelProof::start(&lb);
        let failures = testkit::clients(count, CONCURRENCY, |i| {
            let addr = lb.addr;
            async move {
                let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                let (mut r, mut w) = s.split();
                let send = async {
                    backends::write_stream(&mut w, i as u64, size as u64).await?;
                    w.shutdown().await
                };
                // The backend answers with `size` bytes of the stream seeded by what it received.
                let recv = backends::read_and_check(&mut r, size as u64, size as u64);
                let (sent, got) = tokio::join!(send, recv);
                sent.map_err(|e| format!("client {i}: sending {size} bytes: {e}"))?;
                let (n, ok) = got.map_err(|e| format!("client {i}: reading the reply: {e}"))?;
                if !ok {
                    return Err(format!("client {i}: reply of {n} bytes, wanted exactly {size} intact, then EOF"));
                }
                Ok(())
            }
        })
        .await;
        assert!(
            failures.is_empty(),
            "size {size}: {} of {count} failed: {:?}",
            failures.len(),
            &failures[..5.min(failures.len())]
        );
        if size > 0 {
            proof.assert_kernel_ran(&lb, "client_sends_then_closes");
        }
        eprintln!("[{}] client sends {size} B then closes: {count} replies intact", mode.as_str());
    }
}

async fn backend_reset_after_request_is_a_reset_at_the_client(mode: Mode) {
    let be = Backend::spawn(|mut s| async move {
        let mut req = [0u8; 100];
        if s.read_exact(&mut req).await.is_ok() {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    let Some(lb) = lb_for(mode, "backend_reset", be.addr) else { return };
    let clean_eofs = Arc::new(AtomicU64::new(0));
    let failures = testkit::clients(1500, CONCURRENCY, |i| {
        let (addr, clean_eofs) = (lb.addr, clean_eofs.clone());
        async move {
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            s.write_all(&[7u8; 100]).await.map_err(|e| format!("client {i}: sending: {e}"))?;
            let mut buf = [0u8; 16];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Err(_) => Err(format!("client {i}: nothing within 10 s")),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                Ok(Ok(0)) => {
                    clean_eofs.fetch_add(1, Relaxed);
                    Err(format!("client {i}: clean EOF where the server reset"))
                }
                Ok(other) => Err(format!("client {i}: expected a reset, got {other:?}")),
            }
        }
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of 1500 clients did not see the reset ({} clean EOFs): {:?}",
        failures.len(),
        clean_eofs.load(Relaxed),
        &failures[..5.min(failures.len())]
    );
}
