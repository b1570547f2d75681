//! The maps under the kernel plane: sized from `kernel_memory`, their fill
//! shown by `lb stats` and `/metrics`, and what lb does when one is full.

use std::time::Duration;

use testkit::{Lb, Mode, backends::Backend, retry_until, traffic::open_checked};

/// `map` in `lb stats --json`'s `maps`: (entries, capacity).
fn fill(stats: &serde_json::Value, map: &str) -> (Option<u64>, u64) {
    let row = stats["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|r| r["map"] == map))
        .unwrap_or_else(|| panic!("no {map} in lb stats --json maps: {stats}"));
    (row["entries"].as_u64(), row["capacity"].as_u64().expect("capacity"))
}

/// `lb stats` says how full each map is that fills with connections:
/// `LB_CONN` holds a record per socket, `LB_TARGET` and `LB_SPLICE` each
/// socket; capacities are the configuration's (two sockets per connection
/// lb may hold), and the counts come back to zero when the clients leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_how_full_each_map_is() {
    const CONNS: u32 = 40;
    let be = Backend::echo().await;
    let body = format!("maxconn = 1000\nmetrics_listen = \"127.0.0.1:0\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "map_fill", &body) else { return };
    let conns = open_checked(lb.addr, CONNS).await;
    let want = u64::from(CONNS) * 2;
    let held = retry_until(Duration::from_secs(5), || {
        let s = lb.pinned_stats();
        let all = ["LB_CONN", "LB_TARGET", "LB_SPLICE"].map(|m| fill(&s, m).0);
        (all == [Some(want); 3]).then_some(s)
    })
    .await;
    let s = held.unwrap_or_else(|| panic!("maps never held {want} entries each: {}", lb.pinned_stats()["maps"]));
    // maxconn 1000 over one worker: at most 1001 connections, two sockets each.
    assert_eq!(fill(&s, "LB_CONN").1, 2002, "{}", s["maps"]);
    assert_eq!(fill(&s, "LB_SPLICE").1, 2002, "{}", s["maps"]);
    assert!(fill(&s, "LB_TARGET").1 >= 2002, "{}", s["maps"]);
    assert_eq!(fill(&s, "LB_SERVERS"), (Some(1), 66), "one server, one worker: {}", s["maps"]);
    let text = lb.ctl(&["stats"]);
    assert!(text.contains(&format!("LB_CONN {want}/2002")), "lb stats:\n{text}");
    let metrics = lb.metrics.expect("metrics address");
    let scrape = testkit::http_get(metrics, "/metrics").await.expect("/metrics");
    assert!(scrape.contains(&format!("lb_map_entries{{map=\"LB_SPLICE\"}} {want}")), "{scrape}");
    assert!(scrape.contains("lb_map_capacity{map=\"LB_CONN\"} 2002"), "{scrape}");
    drop(conns);
    let emptied = retry_until(Duration::from_secs(10), || {
        let s = lb.pinned_stats();
        (["LB_CONN", "LB_TARGET", "LB_SPLICE"].map(|m| fill(&s, m).0) == [Some(0); 3]).then_some(())
    })
    .await;
    assert!(emptied.is_some(), "entries left after every client closed: {}", lb.pinned_stats()["maps"]);
}

/// `LB_SERVERS` has room for the configured servers and 64 more per
/// worker; servers added past that cannot be published, and lb says so
/// (it used to skip them without a word) while `lb stats` shows the map full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stats_map_is_reported() {
    let be = Backend::echo().await;
    let Some(lb) = Lb::start(Mode::Kernel, "map_servers_full", &[be.addr]) else { return };
    for port in 1..=70u16 {
        lb.ctl(&["server", "add", "b", &format!("127.0.0.1:{port}")]);
    }
    let warned = retry_until(Duration::from_secs(5), || lb.stderr().contains("LB_SERVERS: ").then_some(())).await;
    assert!(warned.is_some(), "no warning about the full LB_SERVERS:\n{}", lb.stderr());
    assert_eq!(fill(&lb.pinned_stats(), "LB_SERVERS"), (Some(66), 66));
}

/// A client the kernel accepts while `LB_TARGET` is full is no redirect
/// target; `lb_setup` must not splice its server toward it when the server
/// connects later (room freed meanwhile), or the server's reply waits on
/// the server's socket until the idle timeout. Forced with an `LB_TARGET`
/// of 4 entries: two held connections fill it, six clients arrive and wait
/// in the backend's queue (server maxconn 2), then the held ones leave and
/// each waiting client must get its echo at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_is_no_target_is_never_spliced_toward() {
    use testkit::round_trip;
    if !testkit::lbproc::kernel_available("map_no_target") {
        return;
    }
    let be = Backend::echo().await;
    let (dir, pin_path) = testkit::lbproc::scratch();
    let cfg = format!(
        "dataplane = \"kernel\"\npin_path = \"{}\"\n[timeouts]\nqueue = \"30s\"\n\n\
         [[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [{{ addr = \"{}\", maxconn = 2 }}]\nqueue = 100\n",
        pin_path.display(),
        be.addr
    );
    let lb = Lb::launch_with("map_no_target", dir, pin_path, &cfg, &[("LB_TEST_MAP_ENTRIES", "LB_TARGET:4")]);
    let held = open_checked(lb.addr, 2).await;
    let full =
        retry_until(Duration::from_secs(5), || (fill(&lb.pinned_stats(), "LB_TARGET").0 == Some(4)).then_some(()));
    assert!(full.await.is_some(), "two connections do not fill LB_TARGET: {}", lb.pinned_stats()["maps"]);
    let failures_before = lb.pinned_stats()["counters"]["kernel_setup_failures"].as_u64().unwrap();
    let mut waiting = Vec::new();
    for _ in 0..6 {
        waiting.push(tokio::net::TcpStream::connect(lb.addr).await.expect("connect"));
    }
    // Accepted by the kernel (and refused by LB_TARGET) before the held ones leave.
    let refused = retry_until(Duration::from_secs(5), || {
        let f = lb.pinned_stats()["counters"]["kernel_setup_failures"].as_u64().unwrap();
        (f >= failures_before + 6).then_some(())
    });
    assert!(refused.await.is_some(), "the clients were made targets: {}", lb.pinned_stats()["counters"]);
    drop(held);
    // Two at a time (server maxconn), in whatever order lb's queue takes
    // them: each gets its echo, then leaves, freeing its slot.
    let tasks: Vec<_> = waiting
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| tokio::spawn(async move { (i, round_trip(&mut c, 100 + i as u32, 0).await) }))
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(10), futures_join(tasks)).await;
    let results = all.unwrap_or_else(|_| {
        panic!(
            "waiting clients not all served within 10 s (a server spliced toward a client that is no target?)\n{}",
            lb.pinned_stats()["counters"]
        )
    });
    for (i, r) in results {
        assert!(r.is_ok(), "waiting client {i}: {r:?}");
    }
}

/// Every task's result, in order.
async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// A worker killed while it sets up connections leaves their `LB_CONN`
/// records (written before the server's connect) behind: nothing else
/// removes them, since their sockets closed with the worker. Its holder
/// removes them once the worker is gone. Forced with a server that never
/// completes a handshake (its accept queue full), so the connects hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_no_records() {
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    stuck.listen(0).unwrap();
    let addr = stuck.local_addr().unwrap().as_socket().unwrap();
    // Fill its accept queue (it never accepts): further SYNs are dropped.
    let _queued: Vec<_> =
        (0..2).filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()).collect();
    let body = format!("[timeouts]\nconnect = \"30s\"\n\n{}", Lb::body(&[addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "map_worker_killed", &body) else { return };
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tokio::net::TcpStream::connect(lb.addr).await.expect("connect"));
    }
    let written =
        retry_until(Duration::from_secs(5), || (fill(&lb.pinned_stats(), "LB_CONN").0 == Some(6)).then_some(()));
    assert!(written.await.is_some(), "the worker wrote no records: {}", lb.pinned_stats()["maps"]);
    let worker = lb.worker();
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let swept =
        retry_until(Duration::from_secs(5), || (fill(&lb.pinned_stats(), "LB_CONN").0 == Some(0)).then_some(()));
    assert!(swept.await.is_some(), "records left by the killed worker: {}", lb.pinned_stats()["maps"]);
    assert!(lb.stderr().contains("removed 6 connection record(s) the worker left"), "{}", lb.stderr());
}

/// A connection for which a kernel map has no room is copied in userspace
/// (served all the same), counted in `kernel_maps_full` and told in a
/// warning; it used to leave only a debug line. Forced with an `LB_CONN`
/// of 4 records: two held connections fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_is_counted_and_told() {
    use testkit::round_trip;
    if !testkit::lbproc::kernel_available("map_full_fallback") {
        return;
    }
    let be = Backend::echo().await;
    let (dir, pin_path) = testkit::lbproc::scratch();
    let cfg = format!("dataplane = \"kernel\"\npin_path = \"{}\"\n{}", pin_path.display(), Lb::body(&[be.addr]));
    let lb = Lb::launch_with("map_full_fallback", dir, pin_path, &cfg, &[("LB_TEST_MAP_ENTRIES", "LB_CONN:4")]);
    let _held = open_checked(lb.addr, 2).await;
    let mut third = tokio::net::TcpStream::connect(lb.addr).await.expect("connect");
    round_trip(&mut third, 7, 0).await.unwrap_or_else(|e| panic!("the third client was not served: {e}"));
    lb.await_publication();
    let totals = lb.pinned_stats()["totals"].clone();
    assert_eq!(totals["kernel_maps_full"], 1, "{totals}");
    assert_eq!(totals["userspace_fallbacks"], 1, "{totals}");
    assert!(lb.stderr().contains("a kernel map is full"), "no warning:\n{}", lb.stderr());
}

/// The value of the first sample of `metric` in a `/metrics` text.
fn sample(text: &str, metric: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in /metrics:\n{text}"))
}

/// A `/metrics` scrape costs the same few `bpf()` calls whatever the
/// number of connections: it reads the rows workers publish and the
/// verdict's per-server byte counters in batches, and how full the maps
/// are from their fdinfo. (It walked `LB_CONN` and both socket maps' keys:
/// over 4,000 calls for 600 connections, millions at 500,000.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_does_not_walk_the_connections() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    const CONNS: u32 = 600;
    let be = Backend::echo().await;
    let body = format!("metrics_listen = \"127.0.0.1:0\"\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "map_scrape_cost", &body) else { return };
    let _conns = open_checked(lb.addr, CONNS).await;
    let metrics = lb.metrics.expect("metrics address");
    let mut strace = tokio::process::Command::new("strace")
        .args(["-f", "-c", "-e", "trace=bpf", "-p", &lb.pid.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (installed by cargo xtask setup)");
    let mut err = BufReader::new(strace.stderr.take().expect("stderr")).lines();
    let attached = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(l)) = err.next_line().await {
            if l.contains("attached") {
                return true;
            }
        }
        false
    });
    assert!(matches!(attached.await, Ok(true)), "strace did not attach to the supervisor");
    // Let it attach to every thread, then scrape.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = testkit::http_get(metrics, "/metrics").await.expect("/metrics");
    assert_eq!(sample(&text, "lb_kernel_spliced_sockets"), u64::from(CONNS) * 2, "{text}");
    // SAFETY: signalling the strace this test started.
    unsafe { libc::kill(strace.id().expect("strace pid") as i32, libc::SIGINT) };
    let mut table = String::new();
    while let Ok(Some(l)) = err.next_line().await {
        table.push_str(&l);
        table.push('\n');
    }
    let _ = strace.wait().await;
    let calls = testkit::strace_calls(&table, "bpf").unwrap_or(0);
    assert!(calls < 100, "one scrape with {CONNS} connections held made {calls} bpf() calls:\n{table}");
}

/// Per-server byte counters never go down, also while connections end and
/// their records go: the verdict counts every byte it moves per server, so
/// nothing waits for the worker to publish an ended connection's bytes
/// (which left a gap of up to 100 ms, or as long as the worker was
/// stopped, and Prometheus read it as a counter reset). Here the worker is
/// stopped while half the connections end, and every scrape meanwhile and
/// after must be at least the one before; at the end they count every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_never_go_down_as_connections_end() {
    use testkit::round_trip;
    const CONNS: u32 = 20;
    const ROUNDS: u32 = 10;
    let be = Backend::echo().await;
    let body = format!("metrics_listen = \"127.0.0.1:0\"\n[timeouts]\nworker = \"60s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(lb) = Lb::start_with(Mode::Kernel, "map_bytes_monotonic", &body) else { return };
    let metrics = lb.metrics.expect("metrics address");
    let mut conns = open_checked(lb.addr, CONNS).await;
    for round in 1..ROUNDS {
        for (i, c) in conns.iter_mut().enumerate() {
            round_trip(c, i as u32, round).await.unwrap_or_else(|e| panic!("round trip: {e}"));
        }
    }
    // 64 bytes each way per round trip.
    let total = u64::from(CONNS) * u64::from(ROUNDS) * 64;
    let bytes = || async {
        let text = testkit::http_get(metrics, "/metrics").await.expect("/metrics");
        (sample(&text, "lb_server_bytes_in_total"), sample(&text, "lb_server_bytes_out_total"))
    };
    let mut last = bytes().await;
    assert_eq!(last, (total, total), "every byte counted while the connections are live");
    let worker = lb.worker();
    // SAFETY: signalling a process of the lb this test started.
    unsafe { libc::kill(worker as i32, libc::SIGSTOP) };
    let rest = conns.split_off(CONNS as usize / 2);
    drop(conns);
    let gone = retry_until(Duration::from_secs(5), || {
        (fill(&lb.pinned_stats(), "LB_CONN").0 == Some(u64::from(CONNS))).then_some(())
    });
    let gone = gone.await;
    let now = bytes().await;
    // SAFETY: as above.
    unsafe { libc::kill(worker as i32, libc::SIGCONT) };
    assert!(gone.is_some(), "the holder did not close half the connections: {}", lb.pinned_stats()["maps"]);
    assert!(now.0 >= last.0 && now.1 >= last.1, "bytes went down while the worker was stopped: {last:?} -> {now:?}");
    last = now;
    drop(rest);
    for _ in 0..40 {
        let now = bytes().await;
        assert!(now.0 >= last.0 && now.1 >= last.1, "bytes went down as connections ended: {last:?} -> {now:?}");
        last = now;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, (total, total), "every byte counted once the connections ended");
}

/// Two new clients of an instance whose maps hold no more connections
/// than it has (`held`): the kernel accepts them (into the listen backlog,
/// as redirect targets), lb does not while it has no room for them; once
/// two held connections leave, both are served through the kernel, and no
/// connection went to the userspace copy for want of room in a map.
async fn new_clients_wait_for_room(lb: &Lb, mut held: Vec<tokio::net::TcpStream>) {
    lb.await_publication();
    let before = lb.pinned_stats();
    let (accepted, targets) = (before["totals"]["accepted"].clone(), fill(&before, "LB_TARGET").0.expect("LB_TARGET"));
    let mut waiting = Vec::new();
    for i in 0..2u32 {
        let mut c = tokio::net::TcpStream::connect(lb.addr).await.expect("connect");
        waiting.push(tokio::spawn(async move { testkit::round_trip(&mut c, 50 + i, 0).await.map(|()| c) }));
    }
    let in_backlog = retry_until(Duration::from_secs(5), || {
        (fill(&lb.pinned_stats(), "LB_TARGET").0 == Some(targets + 2)).then_some(())
    });
    assert!(in_backlog.await.is_some(), "the kernel did not accept the new clients: {}", lb.pinned_stats()["maps"]);
    // Two publications later, a worker with room would have taken them.
    lb.await_publication();
    lb.await_publication();
    let totals = lb.pinned_stats()["totals"].clone();
    assert_eq!(totals["accepted"], accepted, "lb accepted clients its maps have no room for: {totals}");
    held.truncate(held.len() - 2);
    let served = tokio::time::timeout(Duration::from_secs(10), futures_join(waiting)).await;
    let served = served.unwrap_or_else(|_| panic!("the new clients were not served once room was made"));
    let _clients: Vec<_> = served.into_iter().map(|r| r.unwrap_or_else(|e| panic!("a new client: {e}"))).collect();
    lb.await_publication();
    let totals = lb.pinned_stats()["totals"].clone();
    assert_eq!(totals["kernel_maps_full"], 0, "a client found a map full: {totals}");
    assert_eq!(totals["userspace_fallbacks"], 0, "{totals}");
    drop(held);
}

/// `lb run` taking over after a crash keeps the maps of the instance that
/// crashed, with their capacities: made for `maxconn = 4`, they stay so
/// when the configuration now says 1000, and the new instance keeps to
/// `maxconn = 4` (and says so) where it used to accept clients the maps
/// had no room for, copying them in userspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_keeps_to_the_capacities_of_the_maps_it_takes_over() {
    let be = Backend::echo().await;
    let body = format!("maxconn = 4\n[timeouts]\nqueue = \"30s\"\n\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Kernel, "map_takeover_cap", &body) else { return };
    let held = open_checked(lb.addr, 4).await;
    lb.kill_supervisor();
    let cfg = std::fs::read_to_string(lb.config_path()).unwrap();
    std::fs::write(lb.config_path(), cfg.replace("maxconn = 4\n", "maxconn = 1000\n")).unwrap();
    lb.restart("map_takeover_cap", &[]);
    let log = lb.stderr();
    assert!(log.contains("taking over the earlier lb"), "no takeover:\n{log}");
    assert!(log.contains("maxconn = 4 instead of 1000: the maps taken over hold no more"), "no cap:\n{log}");
    new_clients_wait_for_room(&lb, held).await;
}

/// `lb upgrade` keeps the running instance's maps, with their capacities:
/// the new binary keeps to what they hold, not to what its configuration
/// would make (here the maps were made smaller than the configuration's
/// by the test hook, for 4 connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_to_the_capacities_of_the_maps_it_takes_over() {
    if !testkit::lbproc::kernel_available("map_upgrade_cap") {
        return;
    }
    let be = Backend::echo().await;
    let (dir, pin_path) = testkit::lbproc::scratch();
    let cfg = format!(
        "dataplane = \"kernel\"\npin_path = \"{}\"\nmaxconn = 1000\n[timeouts]\nqueue = \"30s\"\n\n{}",
        pin_path.display(),
        Lb::body(&[be.addr])
    );
    let env = [("LB_TEST_MAP_ENTRIES", "LB_CONN:10,LB_SPLICE:10")];
    let mut lb = Lb::launch_with("map_upgrade_cap", dir, pin_path, &cfg, &env);
    let held = open_checked(lb.addr, 4).await;
    let (ok, out, err) = lb.cli(&["upgrade"]);
    assert!(ok, "lb upgrade failed: {err}");
    lb.upgraded_to(Lb::upgraded_pid(&out).unwrap_or_else(|| panic!("no new pid in {out:?}")));
    let log = lb.stderr();
    assert!(log.contains("maxconn = 4 instead of 1000: the maps taken over hold no more"), "no cap:\n{log}");
    new_clients_wait_for_room(&lb, held).await;
    assert!(lb.stop(), "the upgraded instance did not stop");
}

/// Maps that cannot hold even the listen backlogs of the configuration
/// now (two workers where they were made for one, and few connections):
/// `lb run` says so, stops the holders that crashed and starts anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_the_maps_cannot_hold_is_refused_clearly() {
    let be = Backend::echo().await;
    let body = format!("maxconn = 4\n{}", Lb::body(&[be.addr]));
    let Some(mut lb) = Lb::start_with(Mode::Kernel, "map_takeover_refused", &body) else { return };
    let _held = open_checked(lb.addr, 2).await;
    let holders = lb.holders.clone();
    lb.kill_supervisor();
    let cfg = std::fs::read_to_string(lb.config_path()).unwrap();
    std::fs::write(lb.config_path(), cfg.replace("maxconn = 4\n", "maxconn = 4\nworkers = 2\n")).unwrap();
    lb.restart("map_takeover_refused", &[]);
    let log = lb.stderr();
    assert!(
        log.contains(
            "cannot take them over: its maps cannot hold this configuration: LB_TARGET holds 4107 entries; this \
             configuration needs 8200"
        ) && log.contains("starting anew"),
        "no clear refusal:\n{log}"
    );
    let gone = retry_until(Duration::from_secs(10), || holders.iter().all(|p| !testkit::alive(*p)).then_some(()));
    assert!(gone.await.is_some(), "the refused holders still run");
    let mut fresh = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    testkit::round_trip(&mut fresh, 1, 0).await.unwrap_or_else(|e| panic!("a client of the new instance: {e}"));
    assert_eq!(fill(&lb.pinned_stats(), "LB_TARGET").1, 2 * (4 + 2) + 2 * 4097, "new maps, for two workers");
}
