//! What becomes of a joined connection's flows on the packet plane.
//!
//! - A client that comes back on the same addresses: an ended connection's
//!   flows stay a while (its last ACKs are still rewritten), so the next
//!   connection's SYN meets them. The program takes that SYN for what it
//!   is, a new connection: it removes the old flows and lets the SYN
//!   through, and the new connection is served and joined like any other.
//! - A connection idle for `timeouts.idle`: its flows are removed and it is
//!   counted closed as idle; lb has no socket to tell its peers, so the
//!   next packet either sends meets lb's stack, which answers with a reset.
//!   One that keeps talking is left alone.

use std::{net::SocketAddr, time::Duration};

use testkit::{KernelProof, Lb, Mode, backends::Backend, retry_until};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

/// Connections in a row from one client address and port.
const ROUNDS: u64 = 20;

/// The server echoes until it reads `bye`, then closes first: the client
/// ends without TIME_WAIT and may connect from its port again at once.
async fn echo_until_bye(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || buf[..n].ends_with(b"bye") {
            break;
        }
        if s.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// A connection from 127.0.0.3:`port`. The previous one from there may
/// still wait for the last ACK of its FIN (`LAST_ACK`), which keeps the
/// addresses taken for a moment: tried again for up to a second.
async fn connect_from(port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tries = 0;
    loop {
        let s = TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        let r = match s.bind(SocketAddr::from(([127, 0, 0, 3], port))) {
            Ok(()) => s.connect(to).await,
            Err(e) => Err(e),
        };
        match r {
            Err(e)
                if tries < 100
                    && matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable) =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_a_syn_on_an_ended_flows_addresses_is_a_new_connection() {
    let test = "packet_syn_reuse";
    let be = Backend::spawn(echo_until_bye).await;
    let Some(lb) = Lb::start_with(Mode::Packet, test, &format!("access_log = false\n{}", Lb::body(&[be.addr]))) else {
        return;
    };
    let proof = KernelProof::start(&lb);
    let port = std::net::TcpListener::bind("127.0.0.3:0").unwrap().local_addr().unwrap().port();
    for round in 0..ROUNDS {
        let mut s = connect_from(port, lb.addr).await.unwrap_or_else(|e| panic!("{test}: round {round}: {e}"));
        let hello = format!("hello {round:02}");
        s.write_all(hello.as_bytes()).await.unwrap();
        let back = testkit::read_n(&mut s, hello.len(), test).await;
        assert_eq!(back, hello.as_bytes(), "{test}: round {round}: echo");
        proof.await_joined(&lb, round + 1, Duration::from_secs(10), test).await;
        // Through the program alone, then the server's close.
        s.write_all(b"again").await.unwrap();
        assert_eq!(testkit::read_n(&mut s, 5, test).await, b"again", "{test}: round {round}: echo after the join");
        s.write_all(b"bye").await.unwrap();
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(matches!(eof, Ok(Ok(0))), "{test}: round {round}: the server's close: {eof:?}, {rest:?}");
    }
    let p = lb.pinned_stats()["packet"].clone();
    let reused = p["syn_reuse"].as_u64().unwrap_or(0);
    // Each round's SYN but the first met the flows of the round before
    // (they stay 2 s after the end).
    assert_eq!(reused, ROUNDS - 1, "{test}: SYNs on an ended connection's flows: {p}");
    assert!(lb.all_ended(Duration::from_secs(10)).await, "{test}: not every connection ended: {}", lb.pinned_stats());
    eprintln!("[packet] {test}: {ROUNDS} connections in a row from one port, each joined; {reused} SYNs met old flows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_an_idle_joined_connection_is_removed_and_reset_at_its_next_packet() {
    let test = "packet_idle";
    let be = Backend::spawn(echo_until_bye).await;
    let body = format!("access_log = false\n[timeouts]\nidle = \"1s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Packet, test, &body) else { return };
    let proof = KernelProof::start(&lb);
    let mut conns = Vec::new();
    for i in 0..2u8 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(&[b'a' + i]).await.unwrap();
        assert_eq!(testkit::read_n(&mut s, 1, test).await, [b'a' + i]);
        conns.push(s);
    }
    proof.await_joined(&lb, 2, Duration::from_secs(10), test).await;
    let (mut idle, mut busy) = (conns.remove(0), conns.remove(0));
    // Busy: an echo every 250 ms for 3 s, never idle for 1 s.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        busy.write_all(b"h").await.expect("the active connection was closed");
        assert_eq!(testkit::read_n(&mut busy, 1, test).await, b"h", "{test}: the active connection lost its echo");
    }
    let closed = retry_until(Duration::from_secs(3), || {
        (lb.pinned_stats()["totals"]["idle_closed"].as_u64()? == 1).then_some(())
    })
    .await;
    assert!(closed.is_some(), "{test}: want 1 idle_closed: {}", lb.pinned_stats());
    // The idle one's flows are gone: its next packet is answered with a reset.
    let _ = idle.write_all(b"late").await;
    let mut b = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b)).await;
    assert!(
        matches!(&r, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{test}: the idle connection's next packet should be reset, got {r:?}"
    );
    lb.assert_joined_live(1, "with the active one left").await;
    eprintln!(
        "[packet] {test}: the idle connection removed after 1 s and reset at its next packet; the active one kept"
    );
}
