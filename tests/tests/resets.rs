//! Bytes a peer sent right before its reset are data: through lb they
//! arrive whole before the reset, as they do on a direct connection. A
//! server that replies and then closes with the request half read (the
//! kernel sends the reply, then RST; common with HTTP servers that close
//! early), and a client that sends and then resets.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use testkit::{
    KernelProof, Lb, Mode,
    backends::Backend,
    stream::{Stream, intact, read_to_end},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

testkit::every_path!(server_replies_then_resets, client_sends_then_resets);

/// Exchanges per test and path.
const EXCHANGES: usize = 10_000;
/// Connections in flight at once.
const CONCURRENCY: usize = 48;
/// Reply and request sizes, by exchange number: each small enough that a
/// direct connection delivers it whole (one write, sent at once on loopback).
const SIZES: [usize; 4] = [1, 1000, 4096, 16384];
/// The request of [`server_replies_then_resets`]; the server reads half.
const REQUEST: usize = 100;

fn lb_for(mode: Mode, test: &str, server: std::net::SocketAddr) -> Option<Lb> {
    Lb::start_with(mode, test, &format!("access_log = false\n{}", Lb::body(&[server])))
}

/// The server reads half the request, waits for the rest to be there,
/// replies and closes with it unread: its kernel sends the reply, then a
/// reset. Every client must read the whole reply, then the reset.
async fn server_replies_then_resets(mode: Mode) {
    let be = Backend::spawn(|mut s| async move {
        let mut half = [0u8; REQUEST / 2];
        if s.read_exact(&mut half).await.is_err() {
            return;
        }
        let (seed, size) = (u64::from(half[0]) | u64::from(half[1]) << 8, SIZES[usize::from(half[2])]);
        // The other half unread in the receive queue makes close() a reset.
        let mut rest = [0u8; REQUEST / 2];
        while matches!(s.peek(&mut rest).await, Ok(n) if n < REQUEST / 2) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut reply = vec![0u8; size];
        Stream::new(seed).fill(&mut reply);
        let _ = s.write_all(&reply).await;
    })
    .await;
    let Some(lb) = lb_for(mode, "server_replies_then_resets", be.addr) else { return };
    let proof = KernelProof::start(&lb);
    let failures = testkit::clients(EXCHANGES, CONCURRENCY, |i| {
        let addr = lb.addr;
        async move {
            let (seed, which) = (i as u64 & 0xffff, i % SIZES.len());
            let mut req = [0u8; REQUEST];
            (req[0], req[1], req[2]) = (seed as u8, (seed >> 8) as u8, which as u8);
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("client {i}: connect: {e}"))?;
            s.write_all(&req).await.map_err(|e| format!("client {i}: sending: {e}"))?;
            let (got, reset) = read_to_end(&mut s).await.map_err(|e| format!("client {i}: {e}"))?;
            let size = SIZES[which];
            if !intact(&got, seed, size) {
                return Err(format!("client {i}: got {} bytes, wanted exactly {size} intact", got.len()));
            }
            if !reset {
                return Err(format!("client {i}: clean EOF after the reply where the server reset"));
            }
            Ok(())
        }
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of {EXCHANGES} clients lost the reply sent before the reset: {:?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
    proof.assert_kernel_ran(&lb, "server_replies_then_resets");
    assert_resets_turned(&lb, "server_replies_then_resets");
    eprintln!("[{}] server replies then resets: {EXCHANGES} replies whole, then the reset", mode.as_str());
}

/// The server says hello (so the connection is set up end to end), then
/// reads to the end. The client sends its bytes and resets at once: every
/// server must read them all, then the reset.
async fn client_sends_then_resets(mode: Mode) {
    let seen: Arc<Mutex<Vec<Result<(), String>>>> = Arc::default();
    let log = seen.clone();
    let be = Backend::spawn(move |mut s| {
        let log = log.clone();
        async move {
            let r = async {
                s.write_all(b"h").await.map_err(|e| format!("hello: {e}"))?;
                let (got, reset) = read_to_end(&mut s).await?;
                if got.len() < 3 {
                    return Err(format!("{} bytes, not even the header", got.len()));
                }
                let (seed, size) = (u64::from(got[0]) | u64::from(got[1]) << 8, SIZES[usize::from(got[2])]);
                if got.len() != 3 + size || !intact(&got[3..], seed, size) {
                    return Err(format!("client {seed}: got {} bytes, wanted exactly {} intact", got.len(), 3 + size));
                }
                if !reset {
                    return Err(format!("client {seed}: clean EOF where the client reset"));
                }
                Ok(())
            }
            .await;
            log.lock().unwrap().push(r);
        }
    })
    .await;
    let Some(lb) = lb_for(mode, "client_sends_then_resets", be.addr) else { return };
    let proof = KernelProof::start(&lb);
    let failures = testkit::clients(EXCHANGES, CONCURRENCY, |i| {
        let addr = lb.addr;
        async move {
            let (seed, which) = (i as u64 & 0xffff, i % SIZES.len());
            let mut msg = vec![seed as u8, (seed >> 8) as u8, which as u8];
            msg.resize(3 + SIZES[which], 0);
            Stream::new(seed).fill(&mut msg[3..]);
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("client {i}: connect: {e}"))?;
            let mut hello = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut hello))
                .await
                .map_err(|_| format!("client {i}: no hello within 20 s"))?
                .map_err(|e| format!("client {i}: hello: {e}"))?;
            s.write_all(&msg).await.map_err(|e| format!("client {i}: sending: {e}"))?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).map_err(|e| format!("linger: {e}"))?;
            Ok(())
        }
    })
    .await;
    assert!(failures.is_empty(), "clients failed: {:?}", &failures[..5.min(failures.len())]);
    let done = testkit::retry_until(Duration::from_secs(30), || {
        let n = seen.lock().unwrap().len();
        (n >= EXCHANGES).then_some(n)
    })
    .await;
    let seen = seen.lock().unwrap();
    let lost: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        done.is_some() && lost.is_empty(),
        "{} of {EXCHANGES} servers finished, {} lost bytes the client sent before its reset: {:?}",
        seen.len(),
        lost.len(),
        &lost[..5.min(lost.len())]
    );
    proof.assert_kernel_ran(&lb, "client_sends_then_resets");
    assert_resets_turned(&lb, "client_sends_then_resets");
    eprintln!("[{}] client sends then resets: {EXCHANGES} requests whole, then the reset", mode.as_str());
}

/// On the packet plane, resets that came while lb's sockets still
/// delivered reached the live peer through lb's own, moved by the program
/// to where the dead side's stream ended: its counter proves that path ran.
fn assert_resets_turned(lb: &Lb, test: &str) {
    let s = lb.pinned_stats();
    if !s["packet"].is_object() {
        return;
    }
    let turned = s["packet"]["turned"].as_u64().unwrap_or(0);
    assert!(turned > 0, "{test}: no reset was turned by the program: {}", s["packet"]);
    eprintln!("[packet] {test}: {turned} reset(s) turned toward the live peer");
}
