//! lb between namespaces (`testkit::across`): client — lb — server over
//! two veth pairs, as on a host with clients and servers behind different
//! interfaces. On the
//! packet plane the program sends each rewritten packet out of the
//! interface toward its peer; its counter of packets sent out proves it,
//! and lb keeps no socket of a joined connection. The sockmap plane runs
//! the same tests.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use testkit::{
    KernelProof, Lb, Mode,
    across::{self, Across},
    stream::{Stream, intact, read_to_end},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Connections per bulk test, and what each sends (and gets back).
const BULK: usize = 20;
const BULK_SIZES: [u64; 4] = [0, 1000, 1 << 20, 16 << 20];

/// Every connection says hello and waits for its echo (on the packet
/// plane, until all are joined and lb holds no socket toward the server),
/// then sends its stream and reads it back, at once: byte-exact both ways,
/// then a FIN each way.
fn bulk_both_ways(mode: Mode, v6: bool) {
    let test = if v6 { "veth_bulk_both_ways_ipv6" } else { "veth_bulk_both_ways" };
    let Some(x) = Across::start_on(v6, mode, test, |_| {}, across::echo) else { return };
    x.rt.block_on(async {
        let proof = KernelProof::start(&x.lb);
        let conns = across::hello_all(&x.tri.client.name, x.front, BULK, test).await;
        if mode == Mode::Packet {
            proof.await_joined(&x.lb, BULK as u64, Duration::from_secs(10), test).await;
            x.lb.assert_joined_live(BULK as u64, "once joined").await;
            let held = x.held_toward_server();
            assert_eq!(held, 0, "{test}: lb still holds {held} socket(s) toward the server after the join");
        }
        let failed = across::bulk_both_ways(conns, &BULK_SIZES).await;
        assert!(failed.is_empty(), "{test}: {failed:?}");
        proof.assert_kernel_ran(&x.lb, test);
        if mode == Mode::Packet {
            x.assert_sent_out(test);
            let ended = x.lb.all_ended(Duration::from_secs(10)).await;
            assert!(ended, "{test}: not every connection ended: {}", x.lb.pinned_stats());
        }
        eprintln!("[{}] {test}: {BULK} connections byte-exact both ways, up to 16 MiB", mode.name());
    });
}

/// Connections and sizes of the test with loss.
const LOSSY: usize = 10;
/// Large enough that the loss leaves SACK blocks for the program to
/// translate in every run: with 4 and 1 MiB a run saw 1-19 of them, and
/// now and then none.
const LOSSY_SIZES: [u64; 2] = [16 << 20, 4 << 20];

/// As [`bulk_both_ways`], with 1 % of the packets the client and the
/// server send dropped once the connections are joined: the peers
/// retransmit to each other through the program, and their SACK blocks
/// cross the join translated (its counter), byte-exact both ways.
fn bulk_through_loss(mode: Mode) {
    let test = "veth_bulk_through_loss";
    let Some(x) = Across::start(mode, test, |_| {}, across::echo) else { return };
    x.rt.block_on(async {
        let proof = KernelProof::start(&x.lb);
        let conns = across::hello_all(&x.tri.client.name, x.front, LOSSY, test).await;
        if mode == Mode::Packet {
            proof.await_joined(&x.lb, LOSSY as u64, Duration::from_secs(10), test).await;
        }
        x.tri.lossy(10);
        let failed = across::bulk_both_ways(conns, &LOSSY_SIZES).await;
        assert!(failed.is_empty(), "{test}: {failed:?}");
        proof.assert_kernel_ran(&x.lb, test);
        if mode == Mode::Packet {
            x.assert_sent_out(test);
            let p = x.lb.pinned_stats()["packet"].clone();
            let sack = p["sack_blocks"].as_u64().unwrap_or(0);
            assert!(sack > 0, "{test}: no SACK block crossed the join: {p}");
            eprintln!("[packet] {test}: {sack} SACK blocks translated");
        }
        eprintln!("[{}] {test}: {LOSSY} connections byte-exact both ways through 1 % loss", mode.name());
    });
}

/// Exchanges per reset test, and how many at once.
const EXCHANGES: usize = 2000;
const CONCURRENCY: usize = 32;
/// Reply sizes by exchange number, and the request's size (the server of
/// [`server_replies_then_resets`] reads half of it). A peer that resets
/// discards what it has not sent yet: each size fits in the first flight
/// of a new connection on a 1500-byte path (an initial congestion window
/// of 10 segments of 1448 bytes), so that a direct connection delivers it
/// whole too.
const SIZES: [usize; 4] = [1, 1000, 4096, 12000];
const REQUEST: usize = 100;

/// The server reads half the request, replies and closes with the rest
/// unread (its kernel sends the reply, then a reset): every client reads
/// the whole reply, then the reset.
fn server_replies_then_resets(mode: Mode) {
    let test = "veth_server_replies_then_resets";
    let handler = |mut s: TcpStream| async move {
        let mut half = [0u8; REQUEST / 2];
        if s.read_exact(&mut half).await.is_err() {
            return;
        }
        let (seed, size) = (u64::from(half[0]) | u64::from(half[1]) << 8, SIZES[usize::from(half[2])]);
        let mut rest = [0u8; REQUEST / 2];
        while matches!(s.peek(&mut rest).await, Ok(n) if n < REQUEST / 2) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut reply = vec![0u8; size];
        Stream::new(seed).fill(&mut reply);
        let _ = s.write_all(&reply).await;
    };
    let Some(x) = Across::start(mode, test, |_| {}, handler) else { return };
    x.rt.block_on(async {
        let proof = KernelProof::start(&x.lb);
        let (client, front) = (x.tri.client.name.clone(), x.front);
        let failures = testkit::clients(EXCHANGES, CONCURRENCY, |i| {
            let client = client.clone();
            async move {
                let (seed, which) = (i as u64 & 0xffff, i % SIZES.len());
                let mut req = [0u8; REQUEST];
                (req[0], req[1], req[2]) = (seed as u8, (seed >> 8) as u8, which as u8);
                let mut s = across::connect(&client, front).await.map_err(|e| format!("client {i}: connect: {e}"))?;
                s.write_all(&req).await.map_err(|e| format!("client {i}: sending: {e}"))?;
                let (got, reset) = read_to_end(&mut s).await.map_err(|e| format!("client {i}: {e}"))?;
                if !intact(&got, seed, SIZES[which]) {
                    return Err(format!("client {i}: got {} bytes, wanted exactly {} intact", got.len(), SIZES[which]));
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
            "{test}: {} of {EXCHANGES} clients lost the reply sent before the reset: {:?}",
            failures.len(),
            &failures[..5.min(failures.len())]
        );
        proof.assert_kernel_ran(&x.lb, test);
        if mode == Mode::Packet {
            x.assert_sent_out(test);
            assert_turned(&x.lb, test);
        }
        eprintln!("[{}] {test}: {EXCHANGES} replies whole, then the reset", mode.name());
    });
}

/// Resets that came while lb's sockets still delivered reached the live
/// peer through lb's own socket, moved by the program on its way out of
/// the interface (the egress program: the ingress one never sees it).
fn assert_turned(lb: &Lb, test: &str) {
    let p = lb.pinned_stats()["packet"].clone();
    let turned = p["turned"].as_u64().unwrap_or(0);
    assert!(turned > 0, "{test}: no reset was turned by the program: {p}");
    eprintln!("[packet] {test}: {turned} reset(s) turned toward the live peer");
}

/// The server says hello, then reads to the end; the client sends its
/// bytes and resets at once: every server reads them all, then the reset.
fn client_sends_then_resets(mode: Mode) {
    let test = "veth_client_sends_then_resets";
    let seen: Arc<Mutex<Vec<Result<(), String>>>> = Arc::default();
    let log = seen.clone();
    let handler = move |mut s: TcpStream| {
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
    };
    let Some(x) = Across::start(mode, test, |_| {}, handler) else { return };
    x.rt.block_on(async {
        let proof = KernelProof::start(&x.lb);
        let (client, front) = (x.tri.client.name.clone(), x.front);
        let failures = testkit::clients(EXCHANGES, CONCURRENCY, |i| {
            let client = client.clone();
            async move {
                let (seed, which) = (i as u64 & 0xffff, i % SIZES.len());
                let mut msg = vec![seed as u8, (seed >> 8) as u8, which as u8];
                msg.resize(3 + SIZES[which], 0);
                Stream::new(seed).fill(&mut msg[3..]);
                let mut s = across::connect(&client, front).await.map_err(|e| format!("client {i}: connect: {e}"))?;
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
        assert!(failures.is_empty(), "{test}: clients failed: {:?}", &failures[..5.min(failures.len())]);
        let done = testkit::retry_until(Duration::from_secs(30), || {
            let n = seen.lock().unwrap().len();
            (n >= EXCHANGES).then_some(n)
        })
        .await;
        let seen = seen.lock().unwrap();
        let lost: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            done.is_some() && lost.is_empty(),
            "{test}: {} of {EXCHANGES} servers finished, {} lost bytes the client sent before its reset: {:?}",
            seen.len(),
            lost.len(),
            &lost[..5.min(lost.len())]
        );
        proof.assert_kernel_ran(&x.lb, test);
        if mode == Mode::Packet {
            x.assert_sent_out(test);
            assert_turned(&x.lb, test);
        }
        eprintln!("[{}] {test}: {EXCHANGES} requests whole, then the reset", mode.name());
    });
}

#[test]
fn packet_bulk_both_ways() {
    bulk_both_ways(Mode::Packet, false);
}

#[test]
fn kernel_bulk_both_ways() {
    bulk_both_ways(Mode::Kernel, false);
}

#[test]
fn packet_bulk_both_ways_ipv6() {
    bulk_both_ways(Mode::Packet, true);
}

#[test]
fn kernel_bulk_both_ways_ipv6() {
    bulk_both_ways(Mode::Kernel, true);
}

#[test]
fn packet_server_replies_then_resets() {
    server_replies_then_resets(Mode::Packet);
}

#[test]
fn kernel_server_replies_then_resets() {
    server_replies_then_resets(Mode::Kernel);
}

#[test]
fn packet_client_sends_then_resets() {
    client_sends_then_resets(Mode::Packet);
}

#[test]
fn kernel_client_sends_then_resets() {
    client_sends_then_resets(Mode::Kernel);
}

#[test]
fn packet_bulk_through_loss() {
    bulk_through_loss(Mode::Packet);
}

#[test]
fn kernel_bulk_through_loss() {
    bulk_through_loss(Mode::Kernel);
}
