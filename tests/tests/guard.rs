//! The XDP guard: each rule on hand-built packets (`BPF_PROG_TEST_RUN` on
//! the program lb pinned, with lb's own maps), the lists changed at run
//! time and by a reload, attach and detach; and end to end across a veth
//! pair between two namespaces: a denied source gets nothing through, a
//! SYN flood from one source is rate limited while another source's
//! clients are all served.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use testkit::{
    Lb,
    backends::Backend,
    lbproc::{kernel_available, scratch},
    netns::NetNs,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A TCP segment from `src` to `dst` with `flags`, in an Ethernet frame.
fn tcp(src: IpAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    testkit::packet::tcp([0; 6], src, dst, flags)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn run(prog: &Xdp, packet: &[u8]) -> u32 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

fn guard_stats(lb: &Lb) -> serde_json::Value {
    lb.pinned_stats()["guard"].clone()
}

fn xdp_on(dev: &str) -> bool {
    let out = Command::new("ip").args(["link", "show", dev]).output().expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// Each rule, on packets built here, through the program lb attached.
#[test]
fn rules_on_hand_built_packets() {
    if !kernel_available("guard_rules") {
        return;
    }
    let _ns = NetNs::enter("guard_rules");
    ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    // g1 stays down: no packet reaches g0 but the test's own, so the
    // counters are exact.
    ip(&["link", "set", "g0", "up"]);
    let (dir, pin_path) = scratch();
    let cfg = |deny_extra: &str| {
        format!(
            "dataplane = \"kernel\"\npin_path = \"{}\"\n\
             [guard]\ninterfaces = [\"g0\"]\ndeny = [\"10.9.0.0/16\", \"2001:db8:bad::/48\"{deny_extra}]\n\
             allow = [\"10.9.1.1\"]\nsyn_rate = 1\nsyn_burst = 3\n\
             [[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:7000\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
            pin_path.display()
        )
    };
    let lb = Lb::launch("guard_rules", dir, pin_path.clone(), &cfg(""));
    assert!(lb.stderr().contains("guard: XDP attached to g0 (native mode)"), "{}", lb.stderr());
    assert!(xdp_on("g0"), "no XDP program on g0");
    let prog =
        Xdp::from_pin(pin_path.join("lb_guard"), aya_obj::programs::XdpAttachType::Interface).expect("pinned lb_guard");
    let front: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let other: SocketAddr = "127.0.0.1:9999".parse().unwrap();
    let v6front: SocketAddr = "[::1]:7000".parse().unwrap();
    let a = |s: &str| s.parse::<IpAddr>().unwrap();

    // deny, allow inside deny, deny for every packet, IPv6.
    assert_eq!(run(&prog, &tcp(a("10.9.2.2"), front, SYN)), XDP_DROP, "denied SYN");
    assert_eq!(run(&prog, &tcp(a("10.9.1.1"), front, SYN)), XDP_PASS, "allowed inside a denied prefix");
    assert_eq!(run(&prog, &tcp(a("10.9.2.2"), other, ACK)), XDP_DROP, "denied ACK to another port");
    assert_eq!(run(&prog, &tcp(a("2001:db8:bad::1"), v6front, SYN)), XDP_DROP, "denied IPv6");
    assert_eq!(run(&prog, &tcp(a("2001:db8:1::1"), v6front, SYN)), XDP_PASS, "IPv6 not denied");
    // The SYN rate of one source: a burst of 3, then dropped.
    for i in 0..3 {
        assert_eq!(run(&prog, &tcp(a("192.0.2.7"), front, SYN)), XDP_PASS, "SYN {i} of the burst");
    }
    assert_eq!(run(&prog, &tcp(a("192.0.2.7"), front, SYN)), XDP_DROP, "SYN over the rate");
    // Not limited: its ACKs and SYN-ACKs, SYNs to other ports, other sources.
    assert_eq!(run(&prog, &tcp(a("192.0.2.7"), front, ACK)), XDP_PASS, "ACK of a limited source");
    assert_eq!(run(&prog, &tcp(a("192.0.2.7"), front, SYN | ACK)), XDP_PASS, "SYN-ACK");
    for _ in 0..5 {
        assert_eq!(run(&prog, &tcp(a("192.0.2.7"), other, SYN)), XDP_PASS, "SYN to a port that is no frontend");
    }
    assert_eq!(run(&prog, &tcp(a("192.0.2.8"), front, SYN)), XDP_PASS, "another source");
    // Not IP, or too short to read: passed.
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(run(&prog, &arp), XDP_PASS, "ARP");
    assert_eq!(run(&prog, &tcp(a("10.9.2.2"), front, SYN)[..20]), XDP_PASS, "truncated");
    // A refill: 1 per second (slow enough that no stall of the test
    // between the burst and the fourth SYN can refill the bucket early).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(run(&prog, &tcp(a("192.0.2.7"), front, SYN)), XDP_PASS, "SYN after a refill");

    let g = guard_stats(&lb);
    assert_eq!((g["denied"].as_u64(), g["rate_limited"].as_u64()), (Some(3), Some(1)), "{g}");
    assert_eq!(g["passed"].as_u64(), Some(16), "{g}");
    assert_eq!(g["top"][0]["source"], "10.9.2.2", "{g}");
    assert_eq!(g["top"][0]["dropped"], 2, "{g}");
    assert_eq!(g["deny"], serde_json::json!(["10.9.0.0/16", "2001:db8:bad::/48"]), "{g}");

    // Run time: deny a source, then take it back.
    let x = a("192.0.2.8");
    assert!(lb.ctl(&["guard", "deny", "add", "192.0.2.8"]).contains("added"));
    assert_eq!(run(&prog, &tcp(x, other, ACK)), XDP_DROP, "denied at run time");
    assert!(lb.ctl(&["guard", "show"]).contains("192.0.2.8/32"));
    assert!(lb.ctl(&["guard", "deny", "remove", "192.0.2.8/32"]).contains("removed"));
    assert_eq!(run(&prog, &tcp(x, other, ACK)), XDP_PASS, "no longer denied");
    let (ok, _, err) = lb.cli(&["guard", "deny", "add", "192.0.2.300"]);
    assert!(!ok && err.contains("not an IP address or CIDR"), "{err}");
    // A reload applies the file's lists.
    std::fs::write(lb.config_path(), cfg(", \"203.0.113.0/24\"")).unwrap();
    assert!(lb.ctl(&["reload"]).contains("reloaded"));
    assert_eq!(run(&prog, &tcp(a("203.0.113.5"), other, ACK)), XDP_DROP, "denied by a reload");
    let metrics = lb.pinned_stats();
    assert!(metrics["guard"]["deny"].as_array().unwrap().len() == 3, "{metrics}");
    // A reload of an unchanged file still puts its lists back.
    assert!(lb.ctl(&["guard", "deny", "add", "192.0.2.9"]).contains("added"));
    assert_eq!(run(&prog, &tcp(a("192.0.2.9"), other, ACK)), XDP_DROP, "denied at run time");
    assert!(lb.ctl(&["reload"]).contains("reloaded"));
    assert_eq!(run(&prog, &tcp(a("192.0.2.9"), other, ACK)), XDP_PASS, "a reload keeps a run-time deny");

    drop(prog);
    drop(lb);
    assert!(!xdp_on("g0"), "the guard stayed attached after lb stopped");
}

/// Across a veth pair: lb in one namespace, clients in another, from three
/// addresses: one denied, one flooding SYNs, one connecting normally.
#[test]
fn flood_is_limited_and_others_are_served() {
    if !kernel_available("guard_e2e") {
        return;
    }
    let _a = NetNs::enter("guard_e2e");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let clients = std::thread::spawn(move || {
        let b = NetNs::enter("guard_e2e_b");
        tx.send(b.name.clone()).unwrap();
        go_rx.recv().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let r = rt.block_on(client_side());
        drop(b);
        r
    });
    let b_name = rx.recv().unwrap();
    ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", &b_name]);
    ip(&["addr", "add", "10.200.0.1/24", "dev", "a0"]);
    ip(&["link", "set", "a0", "up"]);
    for addr in ["10.200.0.2/24", "10.200.0.3/24", "10.200.0.4/24"] {
        ip(&["-n", &b_name, "addr", "add", addr, "dev", "b0"]);
    }
    ip(&["-n", &b_name, "link", "set", "b0", "up"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let be = rt.block_on(Backend::echo());
    let (dir, pin_path) = scratch();
    let cfg = format!(
        "dataplane = \"kernel\"\npin_path = \"{}\"\n\
         [guard]\ninterfaces = [\"a0\"]\ndeny = [\"10.200.0.4\"]\nsyn_rate = 5\nsyn_burst = 5\n\
         [[frontend]]\nname = \"f\"\nlisten = \"10.200.0.1:7000\"\nbackend = \"b\"\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        pin_path.display(),
        be.addr
    );
    let lb = Lb::launch("guard_e2e", dir, pin_path, &cfg);
    assert!(lb.stderr().contains("guard: XDP attached to a0 (native mode)"), "{}", lb.stderr());
    // Serve the backend while the clients run.
    go_tx.send(()).unwrap();
    let (flooded, normal, denied) = rt.block_on(async {
        loop {
            if clients.is_finished() {
                break clients.join().expect("client thread");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    eprintln!(
        "[guard] flood: {flooded} of 100 connected; normal source: {normal} of 10 served; denied connected: {denied}"
    );
    assert_eq!(normal, 10, "the normal source's clients served (of 10) during the flood");
    assert!((5..=25).contains(&flooded), "{flooded} of 100 flooding SYNs got through (burst 5, 5/s)");
    assert!(!denied, "the denied source got a connection");
    let g = lb.pinned_stats()["guard"].clone();
    assert!(g["rate_limited"].as_u64().unwrap() >= 70, "{g}");
    assert!(g["denied"].as_u64().unwrap() >= 1, "{g}");
    assert_eq!(g["top"][0]["source"], "10.200.0.2", "{g}");
}

/// From the client namespace: 100 concurrent connects from 10.200.0.2 (a
/// flood), 10 echoes from 10.200.0.3 meanwhile, 4 per second, one connect
/// from the denied 10.200.0.4. Returns (flood connects that succeeded,
/// echoes served, whether the denied one connected).
async fn client_side() -> (usize, usize, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lb: SocketAddr = "10.200.0.1:7000".parse().unwrap();
    let connect_from = |src: &str, within: Duration| {
        let src: SocketAddr = format!("{src}:0").parse().unwrap();
        async move {
            let s = tokio::net::TcpSocket::new_v4().ok()?;
            s.bind(src).ok()?;
            tokio::time::timeout(within, s.connect(lb)).await.ok()?.ok()
        }
    };
    let flood = async {
        let attempts: Vec<_> =
            (0..100).map(|_| tokio::spawn(connect_from("10.200.0.2", Duration::from_millis(1500)))).collect();
        let mut ok = Vec::new();
        for a in attempts {
            if let Ok(Some(s)) = a.await {
                ok.push(s);
            }
        }
        ok.len()
    };
    // Paced under the rate (4/s against 5/s): a client that behaves.
    let normal = async {
        let mut served = 0;
        for i in 0..10 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let Some(mut s) = connect_from("10.200.0.3", Duration::from_secs(2)).await else { continue };
            let mut b = [0u8; 1];
            if s.write_all(b"x").await.is_ok()
                && matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await, Ok(Ok(1)))
            {
                served += 1;
            }
        }
        served
    };
    let denied = connect_from("10.200.0.4", Duration::from_millis(1500));
    let (f, n, d) = tokio::join!(flood, normal, denied);
    (f, n, d.is_some())
}

/// The guard's attachment is a link of the supervisor's process: it goes
/// with a killed supervisor, and `lb run` taking the holders over attaches
/// it again with its own program, while the connections carry on.
#[test]
fn lb_run_after_a_killed_supervisor_attaches_the_guard_again() {
    if !kernel_available("guard_crash") {
        return;
    }
    let _ns = NetNs::enter("guard_crash");
    ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    ip(&["link", "set", "g0", "up"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let be = Backend::echo().await;
        let (dir, pin_path) = scratch();
        let cfg = format!(
            "dataplane = \"kernel\"\npin_path = \"{}\"\n[guard]\ninterfaces = [\"g0\"]\n\n{}",
            pin_path.display(),
            Lb::body(&[be.addr])
        );
        let mut lb = Lb::launch("guard_crash", dir, pin_path.clone(), &cfg);
        let guard_id = || {
            let out =
                Command::new("bpftool").args(["-j", "prog", "show", "pinned"]).arg(pin_path.join("lb_guard")).output();
            let v: serde_json::Value = serde_json::from_slice(&out.expect("bpftool").stdout).unwrap_or_default();
            v["id"].as_u64()
        };
        let before = guard_id().expect("the guard is pinned");
        let mut s = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        testkit::round_trip(&mut s, 1, 0).await.unwrap();
        lb.kill_supervisor();
        let detached = testkit::retry_until(Duration::from_secs(5), || (!xdp_on("g0")).then_some(())).await;
        assert!(detached.is_some(), "the guard stayed attached without its supervisor");
        testkit::round_trip(&mut s, 1, 1).await.unwrap_or_else(|e| panic!("the connection without a supervisor: {e}"));
        lb.restart("guard_crash", &[]);
        assert!(lb.stderr().contains("taking over the earlier lb"), "{}", lb.stderr());
        assert!(xdp_on("g0"), "the guard is not attached again");
        let after = guard_id().expect("the guard is pinned again");
        assert_ne!(before, after, "the guard's program was not loaded again");
        assert!(guard_stats(&lb).is_object(), "lb stats shows no guard: {}", lb.pinned_stats());
        testkit::round_trip(&mut s, 1, 2).await.unwrap_or_else(|e| panic!("the connection after the takeover: {e}"));
        drop(lb);
        assert!(!xdp_on("g0"), "the guard stayed attached after lb stopped");
    });
}
