//! Seeing and steering a running lb: stats against the traffic, bpftool,
//! the control socket (drain, add/remove under load, other users refused),
//! health checks, reload, metrics, conns and the access log.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use testkit::{KernelProof, Lb, Mode, backends::Backend, lbproc::lb_bin, retry_until, stream::Stream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

testkit::both_planes!(
    stats_equal_the_traffic,
    drain_keeps_existing_and_sends_new_elsewhere,
    add_and_remove_under_load_lose_no_bytes,
    health_check_flips_after_fall_and_rise,
    health_checks_with_workers_run_once_in_the_supervisor,
    reload_applies_server_changes_or_rejects_the_whole_file,
    metrics_agree_with_stats,
    refused_connect_goes_to_the_next_server,
);

fn cfg(servers: &[SocketAddr], extra_backend: &str, extra_top: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "{extra_top}\n[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"app\"\n\n\
         [[backend]]\nname = \"app\"\nservers = [{}]\n{extra_backend}\n",
        list.join(", ")
    )
}

/// `n` bytes of stream `seed` through `s` and back, checked.
async fn exchange(s: &mut TcpStream, seed: u64, n: usize) -> Result<(), String> {
    let mut out = vec![0u8; n];
    Stream::new(seed).fill(&mut out);
    let (mut r, mut w) = s.split();
    let send = w.write_all(&out);
    let mut back = vec![0u8; n];
    let recv = r.read_exact(&mut back);
    let (a, b) = tokio::join!(send, recv);
    a.map_err(|e| format!("send: {e}"))?;
    b.map_err(|e| format!("receive: {e}"))?;
    if back != out { Err("echo differs".into()) } else { Ok(()) }
}

async fn echo_once(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    exchange(&mut s, 1, 16).await.unwrap_or_else(|e| panic!("client through lb: {e}"));
    s
}

fn server_row(lb: &Lb, addr: SocketAddr) -> serde_json::Value {
    let s = lb.pinned_stats();
    s["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["addr"] == addr.to_string())
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// A server whose port refuses connections (bound, not listening: no
/// other test can take the port meanwhile) costs each client that tries it
/// first one failed attempt, counted against it; the client is served by
/// the next server.
async fn refused_connect_goes_to_the_next_server(mode: Mode) {
    let good = Backend::echo().await;
    let dead = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    dead.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let dead_addr = dead.local_addr().unwrap().as_socket().unwrap();
    let Some(lb) = Lb::start_with(mode, "refused", &cfg(&[dead_addr, good.addr], "", "")) else { return };
    let proof = KernelProof::start(&lb);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(echo_once(lb.addr).await);
    }
    let counts = retry_until(Duration::from_secs(3), || {
        let (fails, total) =
            (server_row(&lb, dead_addr)["connect_failures"].as_u64()?, server_row(&lb, good.addr)["total"].as_u64()?);
        (fails >= 1 && total == 10).then_some((fails, total))
    })
    .await;
    assert!(counts.is_some(), "10 clients, a refusing server first: {}", lb.pinned_stats());
    assert_eq!(server_row(&lb, dead_addr)["total"], 0, "a refused connect counted as a connection");
    proof.assert_kernel_ran(&lb, "refused");
}

async fn stats_equal_the_traffic(mode: Mode) {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let Some(lb) = Lb::start_with(mode, "stats", &cfg(&[a.addr, b.addr], "source_pool = [\"127.0.5.1\"]", "")) else {
        return;
    };
    let proof = KernelProof::start(&lb);
    // 30 connections, connection i moves 1000 + i bytes each way.
    let mut want = [(0u64, 0u64); 2];
    let mut held = Vec::new();
    for i in 0..30u64 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        exchange(&mut s, i, 1000 + i as usize).await.unwrap();
        held.push(s);
        want[(i % 2) as usize].0 += 1;
        want[(i % 2) as usize].1 += 1000 + i;
    }
    // While they are open: active counts and the JSON shape.
    let live = retry_until(Duration::from_secs(3), || {
        let s = lb.pinned_stats();
        (s["totals"]["active"] == 30).then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("30 active expected: {}", lb.pinned_stats()));
    assert_eq!(live["dataplane"], mode.as_str());
    for key in ["backend", "addr", "state", "active", "total", "bytes_in", "bytes_out"] {
        assert!(live["servers"][0].get(key).is_some(), "servers[].{key} missing: {live}");
    }
    for key in ["ip", "server", "ports_in_use"] {
        assert!(live["sources"][0].get(key).is_some(), "sources[].{key} missing: {live}");
    }
    for key in ["active", "accepted", "rejected", "userspace_fallbacks"] {
        assert!(live["totals"].get(key).is_some(), "totals.{key} missing: {live}");
    }
    assert_eq!(
        live["sources"].as_array().unwrap().iter().map(|s| s["ports_in_use"].as_u64().unwrap()).sum::<u64>(),
        30
    );
    drop(held);
    // Round robin alternates a, b; each server's bytes are its connections' bytes.
    let done = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        (s["totals"]["active"] == 0 && server_row(&lb, b.addr)["bytes_out"].as_u64() == Some(want[1].1)).then_some(s)
    })
    .await;
    assert!(done.is_some(), "stats did not settle: {}", lb.pinned_stats());
    let rows = [server_row(&lb, a.addr), server_row(&lb, b.addr)];
    let got: Vec<(u64, u64, u64)> = rows
        .iter()
        .map(|r| (r["total"].as_u64().unwrap(), r["bytes_in"].as_u64().unwrap(), r["bytes_out"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, vec![(want[0].0, want[0].1, want[0].1), (want[1].0, want[1].1, want[1].1)], "per-server stats");
    assert_eq!(rows[0]["backend"], "app");
    assert_eq!(rows[0]["state"], "up");
    let human = lb.ctl(&["stats"]);
    assert!(human.contains("BACKEND") && human.contains(&a.addr.to_string()), "table:\n{human}");
    // The access log has one line per connection, with its bytes.
    let log = lb.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("lb::access")).collect();
    assert_eq!(lines.len(), 30, "access log lines:\n{log}");
    assert!(
        lines.iter().any(|l| l.contains("bytes_in=1029 bytes_out=1029 close=fin") && l.contains("source=127.0.5.1:"))
    );
    proof.assert_all_spliced(&lb, "stats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpftool_prints_field_names_and_lb_conns_lists_connections() {
    if !testkit::lbproc::kernel_available("bpftool") {
        return;
    }
    let be = Backend::echo().await;
    let lb = Lb::start_with(Mode::Kernel, "bpftool", &cfg(&[be.addr], "", "")).unwrap();
    let proof = KernelProof::start(&lb);
    let _c = echo_once(lb.addr).await;
    proof.assert_all_spliced(&lb, "bpftool");
    retry_until(Duration::from_secs(3), || (lb.pinned_stats()["totals"]["active"] == 1).then_some(())).await;
    for (map, fields) in [
        ("LB_CONN", &["client_port", "server_ip", "last_active_ns", "bytes"][..]),
        ("LB_SERVERS", &["bytes_in", "active", "server_port", "worker"][..]),
        ("LB_SOURCES", &["ports_in_use", "source_ip"][..]),
        ("LB_COUNTERS", &["bytes_redirected", "skbs_redirected"][..]),
    ] {
        let out = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(lb.pin_path.join(map)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "bpftool on {map}: {}", String::from_utf8_lossy(&out.stderr));
        for f in fields {
            assert!(text.contains(&format!("\"{f}\"")), "bpftool dump of {map} lacks field {f}:\n{text}");
        }
    }
    let rows: serde_json::Value = serde_json::from_str(&lb.ctl(&["conns", "--json"])).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["server"], be.addr.to_string());
    assert_eq!(rows[0]["bytes_in"], 16);
    let other: serde_json::Value =
        serde_json::from_str(&lb.ctl(&["conns", "--json", "--server", "127.0.0.1:1"])).unwrap();
    assert_eq!(other.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_root_only() {
    let be = Backend::echo().await;
    let lb = Lb::start_with(Mode::Userspace, "ctl_perms", &cfg(&[be.addr], "", "")).unwrap();
    let sock = lb::control::default_path(&lb.run_dir, &lb.pin_path);
    let meta = std::fs::metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "control socket mode");
    assert_eq!(meta.uid(), 0, "control socket owner");
    // The same command as user nobody is refused; as root it works.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lb_bin())
        .args(["server", "drain", "app"])
        .arg(be.addr.to_string())
        .arg("--pin-path")
        .arg(&lb.pin_path)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a non-root user changed a server: {err}");
    assert!(err.contains("Permission denied") || err.contains("permission denied"), "refusal should say why: {err}");
    assert_eq!(server_row(&lb, be.addr)["state"], "up", "the refused command had an effect");
    lb.ctl(&["server", "drain", "app", &be.addr.to_string()]);
}

async fn drain_keeps_existing_and_sends_new_elsewhere(mode: Mode) {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let Some(lb) = Lb::start_with(mode, "drain", &cfg(&[a.addr, b.addr], "", "")) else { return };
    let proof = KernelProof::start(&lb);
    let mut old = Vec::new();
    for _ in 0..10 {
        old.push(echo_once(lb.addr).await);
    }
    assert_eq!(a.accepted.load(Relaxed), 5);
    let out = lb.ctl(&["server", "drain", "app", &a.addr.to_string()]);
    assert!(out.contains("drain"), "{out}");
    for _ in 0..10 {
        old.push(echo_once(lb.addr).await);
    }
    assert_eq!(a.accepted.load(Relaxed), 5, "a drained server got new connections");
    assert_eq!(b.accepted.load(Relaxed), 15);
    for (i, s) in old.iter_mut().enumerate() {
        exchange(s, 100 + i as u64, 4096).await.unwrap_or_else(|e| panic!("existing connection {i} after drain: {e}"));
    }
    let st = retry_until(Duration::from_secs(3), || (server_row(&lb, a.addr)["state"] == "drain").then_some(())).await;
    assert!(st.is_some(), "stats should show drain: {}", lb.pinned_stats());
    assert_eq!(server_row(&lb, a.addr)["active"], 5, "drained server keeps its connections");
    lb.ctl(&["server", "enable", "app", &a.addr.to_string()]);
    let _n = echo_once(lb.addr).await;
    let _m = echo_once(lb.addr).await;
    assert_eq!(a.accepted.load(Relaxed), 6, "an enabled server takes connections again");
    // Bad requests name what is wrong and change nothing.
    let (ok, _, err) = lb.cli(&["server", "drain", "nope", &a.addr.to_string()]);
    assert!(!ok && err.contains("no backend named \"nope\""), "{err}");
    let (ok, _, err) = lb.cli(&["server", "weight", "app", &a.addr.to_string(), "999"]);
    assert!(!ok && err.contains("weight 999"), "{err}");
    proof.assert_all_spliced(&lb, "drain");
}

async fn add_and_remove_under_load_lose_no_bytes(mode: Mode) {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let Some(lb) = Lb::start_with(mode, "add_remove", &cfg(&[a.addr], "", "")) else { return };
    let proof = KernelProof::start(&lb);
    // One idle connection on a, held until the end, and 20 exchanging checked data for ~1.5 s.
    let held = echo_once(lb.addr).await;
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let (addr, failures) = (lb.addr, failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for round in 0..30 {
                if let Err(e) = exchange(&mut s, i * 1000 + round, 64 * 1024).await {
                    eprintln!("connection {i} round {round}: {e}");
                    failures.fetch_add(1, Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    retry_until(Duration::from_secs(3), || (a.accepted.load(Relaxed) == 21).then_some(())).await;
    lb.ctl(&["server", "add", "app", &b.addr.to_string(), "--weight", "3"]);
    let reply = lb.ctl(&["server", "remove", "app", &a.addr.to_string()]);
    assert!(reply.contains("connections continue until they end"), "{reply}");
    lb.ctl(&["server", "weight", "app", &b.addr.to_string(), "2"]);
    for _ in 0..5 {
        let _s = echo_once(lb.addr).await;
    }
    assert_eq!(a.accepted.load(Relaxed), 21, "a removed server got new connections");
    assert_eq!(b.accepted.load(Relaxed), 5);
    // Stats keep the removed server, as "removed", while it has connections.
    let shown = retry_until(Duration::from_secs(3), || {
        let r = server_row(&lb, a.addr);
        (r["state"] == "removed" && r["active"].as_u64() >= Some(1) && r["total"] == 21).then_some(())
    })
    .await;
    assert!(shown.is_some(), "a removed server with live connections should show as removed: {}", lb.pinned_stats());
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Relaxed), 0, "connections on the removed server lost bytes");
    let (ok, _, err) = lb.cli(&["server", "add", "app", &b.addr.to_string()]);
    assert!(!ok && err.contains("already has server"), "{err}");
    assert_eq!(server_row(&lb, a.addr)["state"], "removed", "its last connection is still open");
    drop(held);
    let gone = retry_until(Duration::from_secs(3), || server_row(&lb, a.addr).is_null().then_some(())).await;
    assert!(gone.is_some(), "a removed server stays in stats after its last connection: {}", lb.pinned_stats());
    assert_eq!(server_row(&lb, b.addr)["weight"], 2);
    proof.assert_all_spliced(&lb, "add_remove");
}

async fn health_check_flips_after_fall_and_rise(mode: Mode) {
    health_flips(mode, "health", "").await;
}

/// With workers, the supervisor checks and relays each flip: every worker
/// follows it, and each flip is still logged once.
async fn health_checks_with_workers_run_once_in_the_supervisor(mode: Mode) {
    health_flips(mode, "health_workers", "workers = 2").await;
}

async fn health_flips(mode: Mode, name: &str, top: &str) {
    let good = Backend::banner(b"PONG\r\n").await;
    let wrong = Backend::echo().await; // replies PING: fails `expect`
    // Stopped and started again at its address: a port no connect can take meanwhile.
    let flappy = Backend::banner_at(Backend::stable_addr(), b"PONG\r\n").await;
    let flappy_addr = flappy.addr;
    let health = "[backend.health]\ninterval = \"100ms\"\nrise = 2\nfall = 3\nsend = \"PING\\r\\n\"\nexpect = \"PONG\"";
    let Some(lb) = Lb::start_with(mode, name, &cfg(&[good.addr, wrong.addr, flappy_addr], health, top)) else {
        return;
    };
    let proof = KernelProof::start(&lb);
    let state = |addr: SocketAddr| server_row(&lb, addr)["state"].as_str().unwrap_or("").to_owned();
    let wrong_down = retry_until(Duration::from_secs(3), || (state(wrong.addr) == "down").then_some(())).await;
    assert!(wrong_down.is_some(), "a server answering PING to PING should fail `expect`: {}", lb.pinned_stats());
    assert_eq!(state(good.addr), "up");
    // Stop flappy: down after 3 failed checks (300-400 ms), not before.
    drop(flappy);
    let t0 = Instant::now();
    retry_until(Duration::from_secs(3), || (state(flappy_addr) == "down").then_some(())).await.expect("flappy down");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(200), "down after {took:?}: fall = 3 at 100 ms needs ~300 ms");
    // Down servers get no new connections (not even attempts).
    let total = |addr: SocketAddr| server_row(&lb, addr)["total"].as_u64().unwrap_or(0);
    let fails = |addr: SocketAddr| server_row(&lb, addr)["connect_failures"].as_u64().unwrap_or(0);
    let before = (total(good.addr), total(wrong.addr), fails(flappy_addr));
    for _ in 0..12 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let mut banner = [0u8; 6];
        s.read_exact(&mut banner).await.expect("served by the healthy server");
        assert_eq!(&banner, b"PONG\r\n");
    }
    let after = retry_until(Duration::from_secs(3), || {
        let now = (total(good.addr), total(wrong.addr), fails(flappy_addr));
        (now.0 == before.0 + 12).then_some(now)
    })
    .await;
    assert_eq!(after, Some((before.0 + 12, before.1, before.2)), "only the up server may get connections");
    if !top.is_empty() {
        // A worker started now learns which servers are down.
        let worker0 = |s: &serde_json::Value| {
            s["workers"].as_array().unwrap().iter().find(|w| w["worker"] == 0).and_then(|w| w["pid"].as_u64())
        };
        let victim = worker0(&lb.pinned_stats()).expect("worker 0 in stats");
        // SAFETY: signalling a process this test started (through lb).
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        retry_until(Duration::from_secs(10), || worker0(&lb.pinned_stats()).filter(|p| *p != victim))
            .await
            .expect("worker 0 restarted");
        let fails_before = fails(flappy_addr);
        for _ in 0..12 {
            let mut s = TcpStream::connect(lb.addr).await.unwrap();
            let mut banner = [0u8; 6];
            let r = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut banner)).await;
            assert!(matches!(r, Ok(Ok(_))), "not served by the healthy server after a worker restart: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await; // two publications
        assert_eq!(fails(flappy_addr), fails_before, "a restarted worker tried the down server");
        assert_eq!(state(flappy_addr), "down");
    }
    // Back on the same port: up after 2 good checks.
    let back = Backend::spawn_at(flappy_addr, |mut s| async move {
        let _ = s.write_all(b"PONG\r\n").await;
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
    })
    .await;
    retry_until(Duration::from_secs(3), || (state(flappy_addr) == "up").then_some(())).await.expect("flappy up again");
    let log = lb.stderr();
    let downs = log.matches(&format!("server {flappy_addr} is down after 3 failed checks")).count();
    let ups = log.matches(&format!("server {flappy_addr} is up (2 checks passed)")).count();
    assert_eq!((downs, ups), (1, 1), "each flip is logged once:\n{log}");
    drop(back);
    drop(good);
    // Everything down: new clients are closed at once and counted.
    retry_until(Duration::from_secs(3), || {
        let s = lb.pinned_stats();
        s["servers"].as_array().unwrap().iter().all(|r| r["state"] == "down").then_some(())
    })
    .await
    .expect("all servers down");
    let r = testkit::turned_away(lb.addr, Duration::from_secs(2)).await;
    assert!(
        r.as_ref().is_ok_and(|t| *t < Duration::from_millis(500)),
        "every server down: expected a quick reset, got {r:?}"
    );
    let counted =
        retry_until(Duration::from_secs(3), || (lb.pinned_stats()["totals"]["no_server_up"] == 1).then_some(())).await;
    assert!(counted.is_some(), "no_server_up: {}", lb.pinned_stats());
    // With workers, one was killed above: its published totals went with it.
    proof.assert_kernel_ran(&lb, name);
}

async fn reload_applies_server_changes_or_rejects_the_whole_file(mode: Mode) {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let Some(lb) = Lb::start_with(mode, "reload", &cfg(&[a.addr], "", "")) else { return };
    let proof = KernelProof::start(&lb);
    let original = std::fs::read_to_string(lb.config_path()).unwrap();
    let with = |from: &str, to: &str| original.replace(from, to);
    let servers_a = format!("servers = [\"{}\"]", a.addr);
    // Add b with weight 2.
    std::fs::write(
        lb.config_path(),
        with(&servers_a, &format!("servers = [\"{}\", {{ addr = \"{}\", weight = 2 }}]", a.addr, b.addr)),
    )
    .unwrap();
    let out = lb.ctl(&["reload"]);
    assert!(out.contains("1 change(s)"), "{out}");
    retry_until(Duration::from_secs(3), || (server_row(&lb, b.addr)["weight"] == 2).then_some(()))
        .await
        .expect("b added");
    // Traffic follows: weights 1:2, so 3 new clients give b two of them.
    for _ in 0..3 {
        let _s = echo_once(lb.addr).await;
    }
    assert_eq!(b.accepted.load(Relaxed), 2, "the reloaded server set is not the one serving");
    // A new maxconn replaces the server: removed, then added again.
    std::fs::write(
        lb.config_path(),
        with(&servers_a, &format!("servers = [\"{}\", {{ addr = \"{}\", weight = 2, maxconn = 5 }}]", a.addr, b.addr)),
    )
    .unwrap();
    let out = lb.ctl(&["reload"]);
    assert!(out.contains("2 change(s)"), "{out}");
    // A broken file is rejected whole, with the key named; nothing changes.
    std::fs::write(lb.config_path(), with(&servers_a, &format!("{servers_a}\nbalance = \"random\""))).unwrap();
    let (ok, _, err) = lb.cli(&["reload"]);
    assert!(!ok && err.contains("reload rejected") && err.contains("(key backend.balance)"), "{err}");
    // So is a change a reload cannot apply, each key named (with a server
    // change in the same file, which must not be applied either).
    let drop_b = |text: String| text.replace(&format!(", {{ addr = \"{}\", weight = 2, maxconn = 5 }}", b.addr), "");
    for (edit, key) in [
        (original.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""), "frontend \"t\": listen"),
        (format!("access_log = false\n{original}"), "access_log"),
        (format!("metrics_listen = \"127.0.0.1:0\"\n{original}"), "metrics_listen"),
        (format!("control_socket = \"{}/other.sock\"\n{original}", lb.dir.display()), "control_socket"),
        (format!("{original}\n[timeouts]\nidle = \"2h\"\n"), "timeouts.idle"),
        (format!("send_buffer = \"1MiB\"\n{original}"), "send_buffer"),
    ] {
        std::fs::write(lb.config_path(), drop_b(edit)).unwrap();
        let (ok, _, err) = lb.cli(&["reload"]);
        assert!(!ok && err.contains(&format!("{key} changed")) && err.contains("restart lb"), "{key}: {err}");
        assert!(!server_row(&lb, b.addr).is_null(), "a rejected reload ({key}) changed the servers");
    }
    // SIGHUP: back to a only.
    std::fs::write(lb.config_path(), &original).unwrap();
    // SAFETY: signalling the lb this test started.
    unsafe { libc::kill(lb.pid as i32, libc::SIGHUP) };
    let gone = retry_until(Duration::from_secs(3), || server_row(&lb, b.addr).is_null().then_some(())).await;
    assert!(gone.is_some(), "SIGHUP did not remove b: {}", lb.pinned_stats());
    proof.assert_all_spliced(&lb, "reload");
}

async fn metrics_agree_with_stats(mode: Mode) {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start_with(mode, "metrics", &cfg(&[be.addr], "", "metrics_listen = \"127.0.0.1:0\"")) else {
        return;
    };
    let proof = KernelProof::start(&lb);
    let addr = lb.metrics.expect("metrics address announced");
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(echo_once(lb.addr).await);
    }
    retry_until(Duration::from_secs(3), || (lb.pinned_stats()["totals"]["active"] == 7).then_some(())).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let value = |line_start: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
    };
    let stats = lb.pinned_stats();
    assert_eq!(value("lb_connections_active "), stats["totals"]["active"].as_u64().unwrap());
    assert_eq!(value("lb_connections_total "), 7);
    assert_eq!(value(&format!("lb_server_active{{backend=\"app\",server=\"{}\"}}", be.addr)), 7);
    assert_eq!(value(&format!("lb_server_up{{backend=\"app\",server=\"{}\"}}", be.addr)), 1);
    assert!(text.contains("# TYPE lb_server_bytes_in counter"), "{text}");
    assert!(text.contains(&format!("lb_server_bytes_in_total{{backend=\"app\",server=\"{}\"}}", be.addr)), "{text}");
    proof.assert_all_spliced(&lb, "metrics");
}

/// With workers, commands reach every worker, and a restarted worker
/// catches up with the commands given before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_apply_commands_and_restarted_ones_catch_up() {
    let mode = if testkit::lbproc::kernel_available("workers_ctl") { Mode::Kernel } else { Mode::Userspace };
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let lb = Lb::start_with(mode, "workers_ctl", &cfg(&[a.addr, b.addr], "", "workers = 2")).unwrap();
    let proof = KernelProof::start(&lb);
    lb.ctl(&["server", "disable", "app", &a.addr.to_string()]);
    for _ in 0..20 {
        let _s = echo_once(lb.addr).await;
    }
    assert_eq!(a.accepted.load(Relaxed), 0, "a worker ignored disable");
    let totals = |lb: &Lb| {
        let s = lb.pinned_stats();
        (s["totals"]["accepted"].as_u64().unwrap(), server_row(lb, b.addr)["total"].as_u64().unwrap())
    };
    let before = retry_until(Duration::from_secs(3), || (totals(&lb) == (20, 20)).then_some(())).await;
    assert!(before.is_some(), "counts before the kill: {:?}", totals(&lb));
    // SAFETY: a worker of the lb this test started.
    unsafe { libc::kill(lb.workers[0] as i32, libc::SIGKILL) };
    let restarted = retry_until(Duration::from_secs(10), || {
        let s = lb.pinned_stats();
        s["workers"].as_array()?.iter().find(|w| w["worker"] == 0 && w["pid"] != lb.workers[0]).map(|_| ())
    })
    .await;
    assert!(restarted.is_some(), "worker 0 not restarted");
    for _ in 0..20 {
        let _s = echo_once(lb.addr).await;
    }
    assert_eq!(a.accepted.load(Relaxed), 0, "the restarted worker forgot the disable");
    // Counters carry on across the restart: nothing counted before is lost.
    let after = retry_until(Duration::from_secs(3), || (totals(&lb) == (40, 40)).then_some(())).await;
    assert!(after.is_some(), "accepted and server total after the restart: {:?}, want (40, 40)", totals(&lb));
    let st = retry_until(Duration::from_secs(3), || (server_row(&lb, a.addr)["state"] == "maint").then_some(())).await;
    assert!(st.is_some(), "{}", lb.pinned_stats());
    proof.assert_kernel_ran(&lb, "workers_ctl");
}

/// One lb per pin path: a second one refuses with the reason; pins left by
/// a killed one are cleaned up by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_refused_and_stale_pins_cleaned() {
    let mode = if testkit::lbproc::kernel_available("pins") { Mode::Kernel } else { Mode::Userspace };
    let be = Backend::echo().await;
    let mut first = Lb::start_with(mode, "pins", &cfg(&[be.addr], "", "")).unwrap();
    let out = Command::new(lb_bin()).args(["run", "--config"]).arg(first.config_path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second lb on the same pin path started");
    assert!(err.contains("another lb (pid ") && err.contains("is running with pin_path"), "{err}");
    // Another pin_path but the first's control socket: refused, naming the
    // first, whose socket is left alone.
    let sock = lb::control::default_path(&first.run_dir, &first.pin_path);
    let other = first.dir.join("other.toml");
    let other_pins = format!("{}-other", first.pin_path.display());
    std::fs::write(
        &other,
        format!(
            "dataplane = \"userspace\"\npin_path = \"{other_pins}\"\ncontrol_socket = \"{}\"\n{}",
            sock.display(),
            cfg(&[be.addr], "", "")
        ),
    )
    .unwrap();
    let out = Command::new(lb_bin()).args(["run", "--config"]).arg(&other).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second lb took over the control socket");
    assert!(err.contains(&format!("belongs to another running lb (pid {})", first.pid)), "{err}");
    assert!(!std::path::Path::new(&other_pins).exists(), "the refused instance left pins behind");
    first.ctl(&["server", "drain", "app", &be.addr.to_string()]);
    // Someone watches its stats; the watch must notice the instance is gone.
    let mut watch = Command::new(lb_bin())
        .args(["stats", "--watch", "0.1", "--pin-path"])
        .arg(&first.pin_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(watch.try_wait().unwrap().is_none(), "lb stats --watch ended while the instance runs");
    // SIGKILL: no cleanup; the pins stay behind.
    // SAFETY: the lb this test started.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    first.stop(); // reaps it
    let ended = retry_until(Duration::from_secs(5), || watch.try_wait().unwrap()).await;
    if ended.is_none() {
        let _ = watch.kill();
    }
    let out = watch.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(ended.is_some_and(|s| !s.success()), "lb stats --watch kept showing a killed instance: {err}");
    assert!(err.contains(&format!("is not running (stale pins from pid {})", first.pid)), "lb stats --watch: {err}");
    assert!(first.pin_path.join("LB_CONN").exists(), "a killed lb's pins should still be there");
    // Its pins are not reported as a running instance.
    for cmd in [&["stats"][..], &["stats", "--json"], &["conns"]] {
        let out = Command::new(lb_bin()).args(cmd).arg("--pin-path").arg(&first.pin_path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lb {cmd:?} on a killed instance's pins succeeded");
        assert!(err.contains(&format!("is not running (stale pins from pid {})", first.pid)), "lb {cmd:?}: {err}");
    }
    let cfg_text = std::fs::read_to_string(first.config_path()).unwrap();
    let second = Lb::launch("pins2", first.dir.clone(), first.pin_path.clone(), &cfg_text);
    assert!(second.stderr().contains("removing stale pins"), "{}", second.stderr());
    let _c = echo_once(second.addr).await;
    drop(second);
    std::mem::forget(first); // its dir and pins belonged to `second`, now cleaned
}

/// The runtime API outlives hostile clients: an over-long request line is
/// refused with a reason and the session closed (lb reads no more than the
/// limit), silent sessions are answered and closed after the read timeout,
/// and while they hold every session slot an operator's command still gets
/// through once they time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_survives_oversized_and_silent_clients() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
    let be = Backend::echo().await;
    let lb = Lb::start_with(Mode::Userspace, "ctl_hostile", &cfg(&[be.addr], "", "")).unwrap();
    let sock = lb::control::default_path(&lb.run_dir, &lb.pin_path);
    let reply_of = |line: &str| -> (bool, String) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"));
        (v["ok"].as_bool().unwrap(), v["message"].as_str().unwrap().to_owned())
    };

    // 1 MiB without a newline: refused after the limit, then closed.
    let mut big = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let junk = vec![b'a'; 1 << 20];
    let _ = tokio::time::timeout(Duration::from_secs(5), big.write_all(&junk)).await;
    let mut r = BufReader::new(big);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(15), r.read_line(&mut line))
        .await
        .expect("an oversized request is answered, not read forever")
        .unwrap();
    let (ok, msg) = reply_of(&line);
    assert!(!ok && msg.contains("too large"), "oversized request: {msg}");
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest).await;
    assert!(!rest.windows(2).any(|w| w == b"{\""), "lb answered again after refusing the framing");

    // More silent sessions than lb serves at once.
    let t0 = std::time::Instant::now();
    let silent: Vec<_> = (0..20)
        .map(|_| {
            let sock = sock.clone();
            tokio::spawn(async move {
                let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
                let mut line = String::new();
                let _ = tokio::time::timeout(Duration::from_secs(30), BufReader::new(s).read_line(&mut line)).await;
                line
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drain = {
        let pin = lb.pin_path.clone();
        let addr = be.addr.to_string();
        tokio::task::spawn_blocking(move || {
            Command::new(lb_bin()).args(["server", "drain", "app", &addr, "--pin-path"]).arg(pin).output().unwrap()
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(30), drain).await.expect("command answered").unwrap();
    assert!(out.status.success(), "operator command failed: {}", String::from_utf8_lossy(&out.stderr));
    retry_until(Duration::from_secs(3), || (server_row(&lb, be.addr)["state"] == "drain").then_some(()))
        .await
        .expect("the operator's drain took effect");
    for s in silent {
        let line = s.await.unwrap();
        let (ok, msg) = reply_of(&line);
        assert!(!ok && msg.contains("no complete request line"), "silent session: {msg}");
    }
    let waited = t0.elapsed();
    assert!(waited >= lb::control::READ_TIMEOUT, "silent sessions closed after {waited:?}");
}

/// A worker that stops making progress (here: SIGSTOP) is killed and
/// replaced within seconds, so the clients SO_REUSEPORT hands it are served
/// by its successor instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_worker_is_replaced() {
    let mode = if testkit::lbproc::kernel_available("hung") { Mode::Kernel } else { Mode::Userspace };
    let be = Backend::echo().await;
    // A heartbeat timeout of 1 s (default 2 s): replaced within ~1.25 s.
    let lb = Lb::start_with(mode, "hung", &cfg(&[be.addr], "", "workers = 2\n[timeouts]\nworker = \"1s\"")).unwrap();
    let stopped = lb.workers[0];
    // SAFETY: a worker of the lb this test started.
    unsafe { libc::kill(stopped as i32, libc::SIGSTOP) };
    let t0 = std::time::Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let addr = lb.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), exchange(&mut s, 500 + i, 1000)).await
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.await.unwrap();
        // A client the stopped worker had accepted is reset when it is
        // killed; every other one is served.
        if let Ok(Err(e)) = &r {
            assert!(e.contains("reset") || e.contains("closed"), "client {i}: {e}");
        }
        assert!(r.is_ok(), "client {i} hung for 10 s");
    }
    let replaced = retry_until(Duration::from_secs(10), || {
        let s = lb.pinned_stats();
        s["workers"].as_array()?.iter().find(|w| w["worker"] == 0 && w["pid"] != stopped).map(|_| ())
    })
    .await;
    assert!(replaced.is_some(), "worker 0 not replaced: {}", lb.pinned_stats());
    assert!(lb.stderr().contains("no heartbeat for 1s (timeouts.worker)"), "{}", lb.stderr());
    assert!(t0.elapsed() < Duration::from_secs(15));
}

/// Output whose reader has gone (`lb stats | head -1`, the pipe closed
/// before lb writes) ends the command quietly with status 0: no panic, no
/// error, for every command that prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_a_closed_pipe_ends_quietly() {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start(Mode::Kernel, "closed_pipe", &[be.addr]) else { return };
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    testkit::round_trip(&mut s, 1, 0).await.unwrap();
    let config = lb.config_path().to_string_lossy().into_owned();
    let with_pins = |a: &[&str]| -> Vec<String> {
        let pins = [lb.pin_path.to_string_lossy(), lb.run_dir.to_string_lossy()];
        a.iter()
            .map(|s| s.to_string())
            .chain(["--pin-path".into(), pins[0].to_string()])
            .chain(["--runtime-dir".into(), pins[1].to_string()])
            .collect()
    };
    let runs = [
        with_pins(&["stats"]),
        with_pins(&["stats", "--json"]),
        with_pins(&["conns"]),
        with_pins(&["conns", "--json"]),
        vec!["check".into(), "--config".into(), config],
    ];
    for args in runs {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let child = Command::new(lb_bin())
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("lb {args:?}: {e}"));
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "lb {args:?} to a closed pipe: {:?}\n{err}", out.status);
    }
}
