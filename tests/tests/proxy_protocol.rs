//! `send_proxy`: the PROXY protocol header each server connection starts
//! with, checked byte by byte against the specification's layout (built
//! here independently of lb's code), on both planes, IPv4 and IPv6.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use testkit::{KernelProof, Lb, Mode, backends::Backend, retry_until, stream::Stream};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

testkit::both_planes!(v1_ipv4, v1_ipv6, v2_ipv4, v2_ipv6);
// Joined on the packet plane, IPv4 and IPv6 (the header is in the
// sequence offsets).
testkit::plane_tests!(packet, Packet, v1_ipv4, v1_ipv6, v2_ipv4, v2_ipv6);

const SIGNATURE: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];

/// What the specification says a header for `client` → `frontend` is.
fn expected(v2: bool, client: SocketAddr, frontend: SocketAddr) -> Vec<u8> {
    if !v2 {
        let fam = if client.is_ipv4() { "TCP4" } else { "TCP6" };
        let line = format!("PROXY {fam} {} {} {} {}\r\n", client.ip(), frontend.ip(), client.port(), frontend.port());
        return line.into_bytes();
    }
    let mut h = SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let (fam, len) = if client.is_ipv4() { (0x11, 12u16) } else { (0x21, 36) };
    h.push(fam);
    h.extend_from_slice(&len.to_be_bytes());
    h.extend(octets(client.ip()));
    h.extend(octets(frontend.ip()));
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&frontend.port().to_be_bytes());
    h
}

/// Reads one header as a PROXY-aware server would: a v2 header by its
/// length field, a v1 line up to CRLF (at most 107 bytes).
async fn read_header(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first).await?;
    let mut h = first.to_vec();
    if first[0] == b'P' {
        let mut line = Vec::new();
        (&mut *r).take(106).read_until(b'\n', &mut line).await?;
        h.extend(line);
    } else {
        let mut fixed = [0u8; 15];
        r.read_exact(&mut fixed).await?;
        h.extend_from_slice(&fixed);
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        let mut rest = vec![0u8; len];
        r.read_exact(&mut rest).await?;
        h.extend(rest);
    }
    Ok(h)
}

/// A server that records each connection's header, then echoes the rest.
async fn proxy_aware_echo(at: SocketAddr, seen: Arc<Mutex<Vec<Vec<u8>>>>) -> Backend {
    Backend::spawn_at(at, move |s| {
        let seen = seen.clone();
        async move {
            let mut r = BufReader::new(s);
            let Ok(h) = read_header(&mut r).await else { return };
            seen.lock().unwrap().push(h);
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if r.get_mut().write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = r.get_mut().shutdown().await;
        }
    })
    .await
}

async fn check(mode: Mode, v2: bool, ipv6: bool) {
    let test = format!("proxy_v{}_{}", if v2 { 2 } else { 1 }, if ipv6 { "ipv6" } else { "ipv4" });
    let local = if ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let be = proxy_aware_echo(local.parse().unwrap(), seen.clone()).await;
    let body = format!(
        "[[frontend]]\nname = \"f\"\nlisten = \"{local}\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nsend_proxy = \"{}\"\n",
        be.addr,
        if v2 { "v2" } else { "v1" }
    );
    let Some(lb) = Lb::start_with(mode, &test, &body) else { return };
    let proof = KernelProof::start(&lb);
    let mut want = Vec::new();
    let mut clients = Vec::new();
    let mut payload = 0u64;
    for i in 0..5u64 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        want.push(expected(v2, s.local_addr().unwrap(), lb.addr));
        // Sent at once, before lb can have connected: it must still come
        // after the header, never before it.
        let mut out = vec![0u8; 20_000];
        Stream::new(i).fill(&mut out);
        s.write_all(&out).await.unwrap();
        let back = testkit::read_n(&mut s, out.len(), &test).await;
        assert!(back == out, "{test}: client {i}: echo corrupt");
        payload += out.len() as u64;
        clients.push(s);
    }
    proof.assert_all_spliced(&lb, &test);
    assert_eq!(*seen.lock().unwrap(), want, "{test}: headers the server read");
    if mode == Mode::Packet && !ipv6 {
        // Once joined, the echo goes through the program alone: the
        // server's stream starts with lb's header, the client's does not.
        proof.await_joined(&lb, 5, Duration::from_secs(5), &test).await;
        for (i, s) in clients.iter_mut().enumerate() {
            let mut out = vec![0u8; 20_000];
            Stream::new(100 + i as u64).fill(&mut out);
            s.write_all(&out).await.unwrap();
            let back = testkit::read_n(s, out.len(), &test).await;
            assert!(back == out, "{test}: client {i}: echo after the join corrupt");
            payload += out.len() as u64;
        }
    }
    drop(clients);
    // The header counts in the bytes to the server.
    let headers: u64 = want.iter().map(|h| h.len() as u64).sum();
    let counted = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let row = s["servers"].as_array()?.iter().find(|r| r["addr"] == be.addr.to_string())?.clone();
        (row["active"] == 0 && row["bytes_in"].as_u64() == Some(payload + headers)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{test}: bytes_in should be {payload} + {headers}: {}", lb.pinned_stats());
}

async fn v1_ipv4(mode: Mode) {
    check(mode, false, false).await;
}
async fn v1_ipv6(mode: Mode) {
    check(mode, false, true).await;
}
async fn v2_ipv4(mode: Mode) {
    check(mode, true, false).await;
}
async fn v2_ipv6(mode: Mode) {
    check(mode, true, true).await;
}

/// Health checks of a `send_proxy = "v2"` backend start with a v2 `LOCAL`
/// header (as HAProxy's `check-send-proxy`), then the check's own bytes; a
/// v1 backend's checks send none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_a_local_header() {
    for (version, want) in
        [("v2", [&SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00], b"PING\r\n"].concat()), ("v1", b"PING\r\n".to_vec())]
    {
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let rec = seen.clone();
        let be = Backend::spawn(move |mut s| {
            let rec = rec.clone();
            async move {
                let mut got = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        got.extend_from_slice(&buf[..n]);
                        if got.ends_with(b"\r\n") {
                            let _ = s.write_all(b"PONG\r\n").await;
                            break;
                        }
                    }
                })
                .await;
                rec.lock().unwrap().push(got);
            }
        })
        .await;
        let body = format!(
            "[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nsend_proxy = \"{version}\"\n\
             [backend.health]\ninterval = \"100ms\"\nsend = \"PING\\r\\n\"\nexpect = \"PONG\"\n",
            be.addr
        );
        let Some(lb) = Lb::start_with(Mode::Userspace, "proxy_health", &body) else { return };
        let checked = retry_until(Duration::from_secs(5), || (seen.lock().unwrap().len() >= 2).then_some(())).await;
        assert!(checked.is_some(), "send_proxy {version}: no health check reached the server");
        let first = seen.lock().unwrap()[0].clone();
        assert_eq!(first, want, "send_proxy {version}: what a health check sent");
        let up = lb.pinned_stats()["servers"][0]["state"].clone();
        assert_eq!(up, "up", "send_proxy {version}: the server should be up");
    }
}
