//! Source-IP pools against the port wall, in a network namespace per test
//! whose ephemeral range is narrowed to 100 ports (40000-40099).
//!
//! Listeners use fixed ports outside that range (a port-0 listener would
//! take one of the 100), and clients bind fixed source ports from 50000 up,
//! so only lb's connections to the backend draw from the narrowed range.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use testkit::{KernelProof, Lb, Mode, backends::Backend, netns::NetNs, retry_until};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const RANGE: &str = "40000 40099";
const PORTS: usize = 100;
const LISTEN: &str = "127.0.0.1:7000";

macro_rules! both_planes {
    ($($name:ident),* $(,)?) => {
        mod kernel { $( #[test] fn $name() { super::in_netns(stringify!($name), super::Mode::Kernel, super::$name); } )* }
        mod userspace { $( #[test] fn $name() { super::in_netns(stringify!($name), super::Mode::Userspace, super::$name); } )* }
    };
}

#[test]
fn packet_plane_books_ports_while_flows_last() {
    in_netns("packet_ports", Mode::Packet, books_ports_while_flows_last);
}

both_planes!(
    ports_are_searched_in_order_from_the_first_connection,
    one_address_takes_the_whole_range_then_refuses,
    four_addresses_take_four_ranges,
    one_address_two_servers_get_a_range_each,
    source_port_range_narrows_the_range,
);

/// Runs `f` on a current-thread runtime inside a fresh namespace.
fn in_netns<F: std::future::Future<Output = ()>>(test: &str, mode: Mode, f: fn(Ctx) -> F) {
    let ns = NetNs::enter(test);
    ns.sysctl("net.ipv4.ip_local_port_range", RANGE);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f(Ctx { ns, mode, test: test.to_owned(), next_port: AtomicU16::new(50000) }));
}

struct Ctx {
    ns: NetNs,
    mode: Mode,
    test: String,
    next_port: AtomicU16,
}

impl Ctx {
    fn lb(&self, backend: &str) -> Option<Lb> {
        let body = format!(
            "[timeouts]\nconnect = \"2s\"\n\n[[frontend]]\nname = \"t\"\nlisten = \"{LISTEN}\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\n{backend}\n"
        );
        Lb::start_with(self.mode, &self.test, &body)
    }

    /// A client from 127.0.0.2 (fixed port) that got through: one byte echoed.
    async fn client(&self) -> std::io::Result<TcpStream> {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::new("127.0.0.2".parse().unwrap(), port))?;
        let mut c = s.connect(LISTEN.parse().unwrap()).await?;
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(3), c.read(&mut b)).await {
            Ok(Ok(1)) => Ok(c),
            Ok(Ok(_)) => Err(std::io::Error::other("closed by lb")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("no echo within 3 s")),
        }
    }

    async fn clients(&self, n: usize) -> Vec<TcpStream> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(self.client().await.unwrap_or_else(|e| panic!("client {i} of {n} should get through: {e}")));
        }
        v
    }

    /// The next client is reset by lb at once (within 1 s).
    async fn refused(&self) {
        let t0 = Instant::now();
        match self.client().await {
            Ok(_) => panic!("a client got through although every source port is taken"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "a refused client must see a reset: {e}");
                assert!(t0.elapsed() < Duration::from_secs(1), "refusal took {:?} ({e})", t0.elapsed());
            }
        }
    }
}

/// `sources` rows of `lb stats --json`: (source ip, server) -> (ports_in_use, exhausted).
fn sources(lb: &Lb) -> HashMap<(String, String), (u64, u64)> {
    let s = lb.pinned_stats();
    s["sources"]
        .as_array()
        .expect("sources array")
        .iter()
        .map(|r| {
            (
                (r["ip"].as_str().unwrap().to_owned(), r["server"].as_str().unwrap().to_owned()),
                (r["ports_in_use"].as_u64().unwrap(), r["exhausted"].as_u64().unwrap()),
            )
        })
        .collect()
}

/// Waits until the published port counts equal `want` (published every 100 ms).
async fn ports_in_use(lb: &Lb, want: &[(&str, &str, u64)]) {
    let ok = retry_until(Duration::from_secs(3), || {
        let s = sources(lb);
        want.iter()
            .all(|(ip, server, n)| s.get(&(ip.to_string(), server.to_string())).map(|v| v.0) == Some(*n))
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "ports in use per source should be {want:?}; lb stats says {:?}", sources(lb));
}

/// Every server socket has a port range of its own, so `connect()` searches
/// the range in order: without one it takes ports of one parity only (here:
/// even) until half the range is in use, and past that every connect walks
/// that whole half first (the slowdown behind "Beating port exhaustion").
async fn ports_are_searched_in_order_from_the_first_connection(cx: Ctx) {
    let _be = Backend::echo_at("127.0.0.1:9000".parse().unwrap()).await;
    let Some(lb) = cx.lb("servers = [\"127.0.0.1:9000\"]\nsource_pool = [\"127.0.1.1\"]") else { return };
    let _held = cx.clients(30).await;
    let ports = cx.ns.ss_ports("127.0.1.1", "127.0.0.1:9000");
    assert_eq!(ports.len(), 30, "ss: {ports:?}");
    // In order, the next port is 1-8 past the last one found (the kernel's
    // random skip): all 30 even by chance has odds of 2^-29.
    assert!(ports.iter().any(|p| p % 2 == 1), "only even ports, as without a range of their own: {ports:?}");
    drop(lb);
}

async fn one_address_takes_the_whole_range_then_refuses(cx: Ctx) {
    let _be = Backend::echo_at("127.0.0.1:9000".parse().unwrap()).await;
    let Some(lb) = cx.lb("servers = [\"127.0.0.1:9000\"]\nsource_pool = [\"127.0.1.1\"]") else { return };
    let proof = KernelProof::start(&lb);
    let mut held = cx.clients(PORTS).await;
    cx.refused().await;
    ports_in_use(&lb, &[("127.0.1.1", "127.0.0.1:9000", PORTS as u64)]).await;
    assert_eq!(cx.ns.ss_count("127.0.1.1", "127.0.0.1:9000"), PORTS, "ss disagrees with the map");
    let s = lb.pinned_stats();
    assert!(s["totals"]["no_source_port"].as_u64().unwrap() >= 1, "exhaustion not counted: {s}");
    assert!(sources(&lb)[&("127.0.1.1".into(), "127.0.0.1:9000".into())].1 >= 1, "pair exhaustion not counted");
    let log = lb.stderr();
    assert!(
        log.contains("backend \"b\": out of source ports") && log.contains("127.0.0.1:9000 on 127.0.1.1"),
        "no warning naming the server and address that ran out:\n{log}"
    );

    // Close 50: the same number of new clients get through again, with no
    // intervention (ports lb closed first sit in TIME_WAIT for about a
    // second before loopback may reuse them, so allow a few seconds).
    held.truncate(PORTS - 50);
    let t0 = Instant::now();
    let mut fresh = 0;
    while fresh < 50 {
        match cx.client().await {
            Ok(c) => {
                held.push(c);
                fresh += 1;
            }
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("only {fresh} of 50 new clients got through after closing 50: {e}"),
        }
    }
    ports_in_use(&lb, &[("127.0.1.1", "127.0.0.1:9000", PORTS as u64)]).await;
    eprintln!("[{}] 100 through, 101st refused; 50 closed, 50 new through after {:?}", cx.mode.as_str(), t0.elapsed());
    proof.assert_all_spliced(&lb, &cx.test);
}

async fn four_addresses_take_four_ranges(cx: Ctx) {
    let _be = Backend::echo_at("127.0.0.1:9000".parse().unwrap()).await;
    let Some(lb) = cx.lb("servers = [\"127.0.0.1:9000\"]\nsource_pool = [\"127.0.1.0/30\"]") else { return };
    let proof = KernelProof::start(&lb);
    let _held = cx.clients(4 * PORTS).await;
    cx.refused().await;
    let want: Vec<(&str, &str, u64)> = ["127.0.1.0", "127.0.1.1", "127.0.1.2", "127.0.1.3"]
        .into_iter()
        .map(|ip| (ip, "127.0.0.1:9000", PORTS as u64))
        .collect();
    ports_in_use(&lb, &want).await;
    for (ip, server, _) in &want {
        assert_eq!(cx.ns.ss_count(ip, server), PORTS, "ss: connections from {ip}");
    }
    proof.assert_all_spliced(&lb, &cx.test);
}

async fn one_address_two_servers_get_a_range_each(cx: Ctx) {
    let _a = Backend::echo_at("127.0.0.1:9000".parse().unwrap()).await;
    let _b = Backend::echo_at("127.0.0.1:9001".parse().unwrap()).await;
    let Some(lb) = cx.lb("servers = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\nsource_pool = [\"127.0.1.1\"]") else {
        return;
    };
    let proof = KernelProof::start(&lb);
    // Without IP_BIND_ADDRESS_NO_PORT, bind() would pick a port unique to
    // the source address and both servers would share one range of 100.
    let _held = cx.clients(2 * PORTS).await;
    cx.refused().await;
    ports_in_use(&lb, &[("127.0.1.1", "127.0.0.1:9000", PORTS as u64), ("127.0.1.1", "127.0.0.1:9001", PORTS as u64)])
        .await;
    proof.assert_all_spliced(&lb, &cx.test);
}

async fn source_port_range_narrows_the_range(cx: Ctx) {
    let _be = Backend::echo_at("127.0.0.1:9000".parse().unwrap()).await;
    // IP_LOCAL_PORT_RANGE on each socket: 40000-40049 within the namespace's 40000-40099.
    let backend = "servers = [\"127.0.0.1:9000\"]\nsource_pool = [\"127.0.1.1\"]\nsource_port_range = \"40000-40049\"";
    let Some(lb) = cx.lb(backend) else { return };
    let proof = KernelProof::start(&lb);
    let _held = cx.clients(50).await;
    cx.refused().await;
    ports_in_use(&lb, &[("127.0.1.1", "127.0.0.1:9000", 50)]).await;
    proof.assert_all_spliced(&lb, &cx.test);
}

/// Connections, and how many at once, through a pool of 16 addresses of
/// 100 ports each on the packet plane: each port stays booked about 2 s
/// after its connection ends, so the pool holds the rate this gives.
const IN_A_ROW: usize = 10_000;
const AT_ONCE: usize = 48;

/// A joined connection's source port has no socket, so lb books it until
/// the connection's flows are gone: 10,000 connections, each joined before
/// it ends, through 1,600 ports, and the server never sees a connection on
/// the addresses of one it still has, nor the program a SYN on a flow's.
async fn books_ports_while_flows_last(cx: Ctx) {
    use std::{collections::HashSet, sync::Arc};
    let live: Arc<std::sync::Mutex<(HashSet<SocketAddr>, u64)>> = Arc::default();
    let seen = live.clone();
    let _be = Backend::spawn_at("127.0.0.1:9000".parse().unwrap(), move |mut s: TcpStream| {
        let seen = seen.clone();
        async move {
            let Ok(peer) = s.peer_addr() else { return };
            if !seen.lock().unwrap().0.insert(peer) {
                seen.lock().unwrap().1 += 1;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
            seen.lock().unwrap().0.remove(&peer);
        }
    })
    .await;
    let Some(lb) = cx.lb("servers = [\"127.0.0.1:9000\"]\nsource_pool = [\"127.0.1.0/28\"]") else { return };
    let proof = KernelProof::start(&lb);
    let cx = Arc::new(cx);
    let gate = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = Vec::new();
    for _ in 0..IN_A_ROW {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let cx = cx.clone();
        tasks.push(tokio::spawn(async move {
            let r = async {
                let mut c = cx.client().await?;
                // Quiet for longer than the join waits: joined before the end.
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.write_all(b"y").await?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await?;
                c.shutdown().await?;
                let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                    .await
                    .map_err(std::io::Error::other)??;
                if n != 0 {
                    return Err(std::io::Error::other("bytes after the echo"));
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            drop(permit);
            r
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {IN_A_ROW} failed: {:?}", failed.len(), &failed[..5.min(failed.len())]);
    let collisions = live.lock().unwrap().1;
    assert_eq!(collisions, 0, "the server got a connection on the addresses of one it still had");
    let joined = proof.joined(&lb);
    assert!(joined >= IN_A_ROW as u64 * 9 / 10, "only {joined} of {IN_A_ROW} joined before their end");
    let p = lb.pinned_stats()["packet"].clone();
    assert_eq!(p["syn_reuse"], 0, "a SYN of lb's hit a flow still there (a port given out again too early): {p}");
    eprintln!("[packet] {IN_A_ROW} connections through 1,600 ports, {joined} joined, no tuple used twice at once");
}
