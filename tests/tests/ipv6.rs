//! IPv6 end to end: frontends, servers and source pools on `::1`, and in a
//! network namespace with IPv6 addresses of its own; both planes and the
//! packet plane (joined, then echoing again),
//! byte-exact, with `lb stats`, `lb conns` and the access log naming the
//! right addresses.

use std::{net::SocketAddr, process::Command, time::Duration};

use testkit::{KernelProof, Lb, Mode, backends::Backend, netns::NetNs, retry_until, stream::Stream};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

macro_rules! planes {
    ($($name:ident),* $(,)?) => {
        mod kernel { $( #[test] fn $name() { super::$name(super::Mode::Kernel); } )* }
        mod userspace { $( #[test] fn $name() { super::$name(super::Mode::Userspace); } )* }
        mod packet { $( #[test] fn $name() { super::$name(super::Mode::Packet); } )* }
    };
}

planes!(loopback, namespace_with_a_pool);

/// On `::1` only: frontend, server and a one-address pool.
fn loopback(mode: Mode) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(mode, "ipv6_lo", "[::1]:0", "[::1]:0", &["::1"]));
}

/// In a namespace: the frontend and the server on their own addresses, a
/// pool of four (`fd00:1::100/126` in the config), each added to `lo` there.
fn namespace_with_a_pool(mode: Mode) {
    let ns = NetNs::enter("ipv6_ns");
    let pool = ["fd00:1::100", "fd00:1::101", "fd00:1::102", "fd00:1::103"];
    for a in ["fd00:1::10", "fd00:1::20"].iter().chain(&pool) {
        let a = format!("{a}/128");
        let out = Command::new("ip").args(["-6", "addr", "add", &a, "dev", "lo", "nodad"]).output().unwrap();
        assert!(out.status.success(), "ip addr add {a}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run(mode, "ipv6_ns", "[fd00:1::10]:0", "[fd00:1::20]:0", &pool));
    drop(ns);
}

async fn run(mode: Mode, test: &str, listen: &str, server: &str, pool: &[&str]) {
    let be = Backend::spawn_at(server.parse().unwrap(), |mut s: TcpStream| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    let cidr = if pool.len() == 4 { format!("\"{}/126\"", pool[0]) } else { format!("\"{}\"", pool[0]) };
    let body = format!(
        "source_pool = [{cidr}]\n[[frontend]]\nname = \"v6\"\nlisten = \"{listen}\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let Some(lb) = Lb::start_with(mode, test, &body) else { return };
    assert!(lb.addr.is_ipv6(), "{test}: frontend {}", lb.addr);
    let proof = KernelProof::start(&lb);
    let n = 8 * pool.len();
    let mut clients = Vec::new();
    for i in 0..n as u64 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let mut out = vec![0u8; 10_000 + i as usize];
        Stream::new(600 + i).fill(&mut out);
        s.write_all(&out).await.unwrap();
        let back = testkit::read_n(&mut s, out.len(), test).await;
        assert!(back == out, "{test}: client {i}: echo corrupt");
        clients.push(s);
    }
    proof.assert_all_spliced(&lb, test);
    if mode == Mode::Packet {
        // Joined, then carried by the program alone: another echo each.
        proof.await_joined(&lb, n as u64, Duration::from_secs(10), test).await;
        for (i, s) in clients.iter_mut().enumerate() {
            let mut out = vec![0u8; 20_000 + i];
            Stream::new(900 + i as u64).fill(&mut out);
            s.write_all(&out).await.unwrap();
            let back = testkit::read_n(s, out.len(), test).await;
            assert!(back == out, "{test}: client {i}: echo after the join corrupt");
        }
        lb.assert_joined_live(n as u64, "once joined").await;
        assert!(proof.assert_kernel_ran(&lb, test) > 0, "{test}: no packet rewritten");
    }

    // Stats name the IPv6 server and spread the connections over the pool.
    let want: Vec<String> = pool.iter().map(|p| p.to_string()).collect();
    let spread = retry_until(Duration::from_secs(3), || {
        let s = lb.pinned_stats();
        let mut rows: Vec<(String, u64)> = s["sources"]
            .as_array()?
            .iter()
            .filter(|r| r["server"] == be.addr.to_string())
            .map(|r| (r["ip"].as_str().unwrap_or("").to_owned(), r["ports_in_use"].as_u64().unwrap_or(0)))
            .collect();
        rows.sort();
        (rows.iter().map(|r| r.1).sum::<u64>() == n as u64).then_some(rows)
    })
    .await
    .unwrap_or_else(|| panic!("{test}: sources: {}", lb.pinned_stats()));
    assert_eq!(spread.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), want, "{test}: source addresses");
    assert!(spread.iter().all(|r| r.1 == 8), "{test}: 8 connections per source address: {spread:?}");
    let stats = lb.pinned_stats();
    assert_eq!(stats["servers"][0]["addr"], be.addr.to_string(), "{test}");
    assert_eq!(stats["servers"][0]["active"], n as u64, "{test}");

    // lb conns (kernel plane) lists each connection with its IPv6 addresses.
    let locals: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    if mode == Mode::Kernel {
        let rows: serde_json::Value = serde_json::from_str(&lb.ctl(&["conns", "--json"])).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), n, "{test}: lb conns: {rows:?}");
        for r in rows {
            let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
            let source: SocketAddr = r["source"].as_str().unwrap().parse().unwrap();
            assert!(locals.contains(&client), "{test}: lb conns client {client}");
            assert!(want.contains(&source.ip().to_string()), "{test}: lb conns source {source}");
            assert_eq!(r["server"], be.addr.to_string());
        }
    }
    drop(clients);
    // The access log names them too.
    let logged = retry_until(Duration::from_secs(5), || {
        let log = lb.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("lb::access")).collect();
        (lines.len() == n).then(|| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>())
    })
    .await
    .unwrap_or_else(|| panic!("{test}: {n} access log lines expected:\n{}", lb.stderr()));
    for c in &locals {
        let line =
            logged.iter().find(|l| l.contains(&format!("client={c} "))).unwrap_or_else(|| panic!("no line for {c}"));
        assert!(line.contains(&format!("server={} ", be.addr)), "{line}");
        assert!(want.iter().any(|p| line.contains(&format!("source=[{p}]:"))), "{line}");
    }
}
