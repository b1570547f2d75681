//! A client that comes back on the same addresses: on the packet plane an
//! ended connection's flows stay a while (its last ACKs are still
//! rewritten), so the next connection's SYN meets them. The program takes
//! that SYN for what it is, a new connection: it removes the old flows and
//! lets the SYN through, and the new connection is served and joined like
//! any other.

use std::{net::SocketAddr, time::Duration};

use testkit::{KernelProof, Lb, Mode, backends::Backend};
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
