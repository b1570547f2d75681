//! Routing by TLS server name (`sni`): lb peeks at the ClientHello, picks
//! the backend, and the ClientHello reaches it unchanged; lb never
//! terminates TLS.

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use lb::sni::client_hello;
use testkit::{KernelProof, Lb, Mode, backends::Backend, retry_until};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

testkit::both_planes!(routes_by_server_name, silent_and_garbage_clients_are_closed_and_counted);
testkit::plane_tests!(packet, Packet, routes_by_server_name);

fn config(a: &Backend, b: &Backend, default: &Backend, extra: &str) -> String {
    format!(
        "{extra}\n[[frontend]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nbackend = \"default\"\n\
         sni = {{ \"a.example\" = \"a\", \"*.b.example\" = \"b\", \"C.B.Example\" = \"a\" }}\n\n\
         [[backend]]\nname = \"a\"\nservers = [\"{}\"]\n\n[[backend]]\nname = \"b\"\nservers = [\"{}\"]\n\n\
         [[backend]]\nname = \"default\"\nservers = [\"{}\"]\n",
        a.addr, b.addr, default.addr
    )
}

/// Sends `parts` (with a pause between them) and expects every byte back
/// from the echoing backend, unchanged.
async fn through(lb: &Lb, parts: &[&[u8]]) -> TcpStream {
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut all = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        s.write_all(p).await.unwrap();
        all.extend_from_slice(p);
    }
    let back = testkit::read_n(&mut s, all.len(), "sni").await;
    assert!(back == all, "the bytes came back changed");
    s
}

async fn routes_by_server_name(mode: Mode) {
    let (a, b, default) = (Backend::echo().await, Backend::echo().await, Backend::echo().await);
    let Some(lb) = Lb::start_with(mode, "sni", &config(&a, &b, &default, "")) else { return };
    let proof = KernelProof::start(&lb);
    let mut held = Vec::new();
    let hello = |n: &str| client_hello(Some(n));
    let (h_a, h_b, h_deep, h_c) =
        (hello("a.example"), hello("x.b.example"), hello("deep.x.b.example"), hello("c.b.example"));
    let (h_bare, h_other, h_none) = (hello("b.example"), hello("other.example"), client_hello(None));
    let split = hello("A.EXAMPLE.");
    // Exact names, wildcards (any depth), an exact name beating a wildcard.
    for h in [&h_a, &h_b, &h_deep, &h_c] {
        held.push(through(&lb, &[h]).await);
    }
    // No match, no SNI, not TLS at all: the default backend.
    for h in [&h_bare, &h_other, &h_none] {
        held.push(through(&lb, &[h]).await);
    }
    held.push(through(&lb, &[b"GET / HTTP/1.0\r\n\r\n"]).await);
    // A ClientHello in three segments (record header, half, rest), case and
    // trailing dot ignored.
    held.push(through(&lb, &[&split[..3], &split[3..40], &split[40..]]).await);
    // The same in two records of one handshake message.
    let hs = &split[5..];
    let mut two = Vec::new();
    for part in [&hs[..20], &hs[20..]] {
        two.extend_from_slice(&[0x16, 0x03, 0x01]);
        two.extend_from_slice(&(part.len() as u16).to_be_bytes());
        two.extend_from_slice(part);
    }
    held.push(through(&lb, &[&two[..30], &two[30..]]).await);
    let counts = [&a, &b, &default].map(|be| be.accepted.load(Relaxed));
    assert_eq!(counts, [4, 2, 4], "connections per backend [a, b, default]");
    proof.assert_all_spliced(&lb, "sni");
    if mode == Mode::Packet {
        // lb read the ClientHello before it connected; once joined, the
        // bytes go through the program alone, each to its own server.
        proof.await_joined(&lb, held.len() as u64, Duration::from_secs(5), "sni").await;
        for (i, s) in held.iter_mut().enumerate() {
            let mut out = vec![0u8; 10_000];
            testkit::stream::Stream::new(i as u64).fill(&mut out);
            s.write_all(&out).await.unwrap();
            let back = testkit::read_n(s, out.len(), "sni").await;
            assert!(back == out, "sni: connection {i}: echo after the join corrupt");
        }
    }
    let totals = &lb.pinned_stats()["totals"];
    assert_eq!((totals["client_hello_timeouts"].as_u64(), totals["client_hello_invalid"].as_u64()), (Some(0), Some(0)));
}

/// Connects, sends `first`, and expects lb to close the connection (reset
/// or EOF) without a byte; returns how long that took.
async fn closed(lb: &Lb, first: &[u8]) -> Duration {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    if !first.is_empty() {
        s.write_all(first).await.unwrap();
    }
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => t0.elapsed(),
        other => panic!("expected lb to close the client, got {other:?}"),
    }
}

async fn silent_and_garbage_clients_are_closed_and_counted(mode: Mode) {
    let (a, b, default) = (Backend::echo().await, Backend::echo().await, Backend::echo().await);
    let body = config(&a, &b, &default, "[timeouts]\nclient_hello = \"300ms\"");
    let Some(lb) = Lb::start_with(mode, "sni_bad", &body) else { return };
    let silent = closed(&lb, b"").await;
    assert!(silent >= Duration::from_millis(250), "a silent client closed after {silent:?}, before the timeout");
    let partial = closed(&lb, &client_hello(Some("a.example"))[..10]).await;
    assert!(partial >= Duration::from_millis(250), "a partial ClientHello closed after {partial:?}");
    // A handshake record whose message is a ServerHello, not a ClientHello.
    let garbage = closed(&lb, &[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]).await;
    assert!(garbage < Duration::from_millis(250), "garbage was not refused at once ({garbage:?})");
    let counted = retry_until(Duration::from_secs(3), || {
        let t = lb.pinned_stats()["totals"].clone();
        (t["client_hello_timeouts"] == 2 && t["client_hello_invalid"] == 1).then_some(())
    })
    .await;
    assert!(counted.is_some(), "counters: {}", lb.pinned_stats()["totals"]);
    let reached = [&a, &b, &default].map(|be| be.accepted.load(Relaxed));
    assert_eq!(reached, [0, 0, 0], "a refused client reached a backend");
}
