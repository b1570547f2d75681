//! lb as a non-root service: the user, the capabilities and the runtime
//! directory of `dist/lb.service`, and nothing else.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use testkit::{
    KernelProof, Lb,
    backends::Backend,
    lbproc::{Launch, kernel_available, lb_bin, scratch},
    stream::Stream,
};

/// 16 KiB of stream `seed` through `s` and back, checked.
async fn echo_round(s: &mut TcpStream, seed: u64) {
    let mut out = vec![0u8; 16 << 10];
    Stream::new(seed).fill(&mut out);
    s.write_all(&out).await.unwrap();
    let back = testkit::read_n(s, out.len(), "non_root").await;
    assert!(back == out, "seed {seed}: echo corrupt");
}

/// `nobody`: a user with no privilege of its own.
const UID: u32 = 65534;
const GID: u32 = 65534;

/// The capabilities the unit file grants, as written there
/// (`CAP_BPF CAP_NET_ADMIN`). Its bounding set must say the same.
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/lb.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    let key = |k: &str| -> Vec<String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{}: no {k}=", unit.display()));
        let mut v: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        v.sort();
        v
    };
    let ambient = key("AmbientCapabilities");
    assert_eq!(ambient, key("CapabilityBoundingSet"), "the unit's ambient and bounding sets differ");
    assert!(text.contains("\nUser=lb\n") && text.contains("\nRuntimeDirectory=lb\n"), "unit: User=/RuntimeDirectory=");
    ambient
}

/// The bit of `CAP_X` in /proc/PID/status masks.
fn cap_bit(name: &str) -> u64 {
    match name {
        "CAP_NET_BIND_SERVICE" => 1 << 10,
        "CAP_NET_ADMIN" => 1 << 12,
        "CAP_SYS_ADMIN" => 1 << 21,
        "CAP_PERFMON" => 1 << 38,
        "CAP_BPF" => 1 << 39,
        other => panic!("cap_bit: add {other}"),
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).map(|v| v.trim().to_owned()).unwrap_or_default()
}

/// Directories the test made for the service user, removed at the end
/// (also when the test fails).
struct Owned(Vec<PathBuf>);

impl Owned {
    fn dir(&mut self, p: PathBuf) -> PathBuf {
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        std::os::unix::fs::chown(&p, Some(UID), Some(GID)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        self.0.push(p.clone());
        p
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// lb as the unit starts it: as `nobody` with only the unit's
/// capabilities, its `runtime_dir` and its bpffs directory handed to that
/// user (removed by `owned`). `body` is the configuration after `pin_path`,
/// `runtime_dir` and `metrics_listen`. Returns lb and its runtime_dir.
fn launch_as_service(test: &str, body: &str, owned: &mut Owned) -> (Lb, PathBuf) {
    let caps = unit_capabilities();
    let (dir, pins) = scratch();
    // As in the unit: a bpffs directory the service owns, the pins below it.
    let bpf_dir = owned.dir(PathBuf::from(format!("{}-svc", pins.display())));
    let pin_path = bpf_dir.join("pins");
    let run_dir = owned.dir(dir.join("run"));
    // The test's scratch directory may sit under a directory `nobody`
    // cannot enter (a clone in a 0700 mktemp dir): lb runs from a copy.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("lb");
    std::fs::copy(lb_bin(), &bin).expect("copying lb");
    let cfg = format!(
        "dataplane = \"kernel\"\npin_path = \"{}\"\nruntime_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{body}",
        pin_path.display(),
        run_dir.display(),
    );
    let setpriv_caps =
        caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect::<Vec<_>>();
    let set = format!("-all,{}", setpriv_caps.join(","));
    let wrapper = vec![
        "setpriv".to_owned(),
        format!("--reuid={UID}"),
        format!("--regid={GID}"),
        "--clear-groups".to_owned(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--".to_owned(),
    ];
    let how = Launch { wrapper, bin: Some(bin), run_dir: Some(run_dir.clone()), ..Launch::default() };
    (Lb::launch_as(test, dir, pin_path, &cfg, how), run_dir)
}

/// lb started as `nobody` with only the unit's capabilities: the kernel
/// plane loads and splices, the process holds exactly those capabilities,
/// and the control socket is the service user's alone (root may use it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_non_root_with_only_the_unit_capabilities() {
    if !kernel_available("non_root") {
        return;
    }
    let caps = unit_capabilities();
    let be = Backend::echo().await;
    let mut owned = Owned(Vec::new());
    // A port below 1024, as a load balancer's usually is: it needs the
    // unit's CAP_NET_BIND_SERVICE.
    let low = (900..1024)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .expect("a free port below 1024");
    let body = format!(
        "[[frontend]]\nname = \"t\"\nlisten = \"{low}\"\nbackend = \"b\"\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let (lb, run_dir) = launch_as_service("non_root", &body, &mut owned);
    let pin_path = lb.pin_path.clone();
    assert_eq!(lb.dataplane, "kernel", "lb as a non-root user did not run the kernel plane:\n{}", lb.stderr());
    assert_eq!(lb.addr, low, "listening on a port below 1024");

    // Every process of the instance runs as nobody with exactly the unit's capabilities.
    let want: u64 = caps.iter().map(|c| cap_bit(c)).fold(0, |a, b| a | b);
    for pid in lb.pids() {
        let uid = status_field(pid, "Uid");
        assert!(uid.split_whitespace().all(|u| u == UID.to_string()), "pid {pid}: Uid {uid}");
        let eff = u64::from_str_radix(&status_field(pid, "CapEff"), 16).expect("CapEff");
        assert_eq!(eff, want, "pid {pid}: effective capabilities {eff:#x}, the unit grants {want:#x} ({caps:?})");
    }

    // Bytes arrive exact, through the kernel splice.
    let proof = KernelProof::start(&lb);
    let mut clients = Vec::new();
    for i in 0..10u64 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        for round in 0..4 {
            echo_round(&mut s, i * 10 + round).await;
        }
        clients.push(s);
    }
    proof.assert_all_spliced(&lb, "non_root");
    // With those capabilities lb also attaches lb_setup to its cgroup: the
    // kernel spliced every server socket at ESTABLISHED.
    assert_eq!(proof.kernel_setups(&lb), 10, "lb_setup did not set up the connections:\n{}", lb.stderr());
    drop(clients);

    // Its files live in runtime_dir, owned by the service user; the control
    // socket is owner-only, and root gets through it.
    let sock = lb_common::files::run_file(&run_dir, &pin_path, "sock");
    let meta = std::fs::metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert_eq!((meta.uid(), meta.mode() & 0o777), (UID, 0o600), "control socket owner and mode");
    assert!(!Path::new(lb_common::files::RUN_DIR).join(sock.file_name().unwrap()).exists(), "a file in /run/lb");
    let out = lb.ctl(&["server", "drain", "b", &be.addr.to_string()]);
    assert!(out.contains("draining"), "{out}");
    let metrics = lb.metrics.expect("metrics address");
    let body = tokio::time::timeout(Duration::from_secs(5), testkit::http_get(metrics, "/metrics"))
        .await
        .expect("metrics within 5 s")
        .expect("metrics");
    assert!(body.contains("lb_connections_total 10"), "{body}");
    drop(lb);
    assert!(!pin_path.exists(), "pins left at {}", pin_path.display());
    assert!(!sock.exists(), "control socket left at {}", sock.display());
}

/// The packet plane as the service runs it: the verifier takes its TC
/// programs without `CAP_PERFMON`, lb attaches them (tcx) and closes its
/// sockets in repair mode with `CAP_NET_ADMIN`, and joined connections
/// echo byte-exact through the program alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_plane_runs_as_non_root_with_only_the_unit_capabilities() {
    if !kernel_available("non_root_packet") {
        return;
    }
    let be = Backend::echo().await;
    let mut owned = Owned(Vec::new());
    let body = format!(
        "splice = \"packet\"\n[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\n",
        be.addr
    );
    let (lb, _) = launch_as_service("non_root_packet", &body, &mut owned);
    assert!(
        lb.pinned_stats()["packet"].is_object(),
        "the packet plane did not start as a non-root service:\n{}",
        lb.stderr()
    );
    let proof = KernelProof::start(&lb);
    let mut clients = Vec::new();
    for i in 0..10u64 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        echo_round(&mut s, 500 + i).await;
        clients.push(s);
    }
    proof.await_joined(&lb, 10, Duration::from_secs(10), "non_root_packet").await;
    for (i, s) in clients.iter_mut().enumerate() {
        echo_round(s, 600 + i as u64).await;
    }
    assert!(proof.assert_kernel_ran(&lb, "non_root_packet") > 0, "no packet rewritten");
    lb.assert_joined_live(10, "once joined").await;
}

/// The XDP guard as the service loads it: the verifier takes every path of
/// the program (VLAN tags, IPv6 extension headers, the SYN limit) without
/// `CAP_PERFMON`, which refuses byte loops and computed offsets into map
/// values; and the program it attached decides as the rules say.
#[test]
fn guard_loads_as_non_root_with_only_the_unit_capabilities() {
    use aya::programs::{TestRun as _, TestRunOptions, Xdp};
    use testkit::packet::{Ext, TPID_8021AD, TPID_8021Q, tagged, tcp_ext};

    if !kernel_available("non_root_guard") {
        return;
    }
    let _ns = testkit::netns::NetNs::enter("non_root_guard");
    for args in [&["link", "add", "g0", "type", "veth", "peer", "name", "g1"][..], &["link", "set", "g0", "up"]] {
        let out = std::process::Command::new("ip").args(args).output().expect("running ip");
        assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let mut owned = Owned(Vec::new());
    let body = "[guard]\ninterfaces = [\"g0\"]\ndeny = [\"10.9.0.0/16\"]\nsyn_rate = 1\nsyn_burst = 1\n\
                [[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:7000\"\nbackend = \"b\"\n\
                [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n";
    let (lb, _) = launch_as_service("non_root_guard", body, &mut owned);
    assert!(lb.stderr().contains("guard: XDP attached to g0"), "{}", lb.stderr());
    let prog = Xdp::from_pin(lb.pin_path.join("lb_guard"), aya_obj::programs::XdpAttachType::Interface)
        .unwrap_or_else(|e| panic!("pinned lb_guard: {e}"));
    let run = |frame: &[u8]| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    };
    let (xdp_drop, xdp_pass) = (1, 2);
    let front6: SocketAddr = "[::1]:7000".parse().unwrap();
    let denied = tcp_ext([0; 6], "10.9.0.1".parse().unwrap(), "127.0.0.1:7000".parse().unwrap(), 0x10, &[]);
    assert_eq!(run(&tagged(&denied, &[TPID_8021AD, TPID_8021Q])), xdp_drop, "denied source behind QinQ");
    let syn = tcp_ext([0; 6], "2001:db8::1".parse().unwrap(), front6, 0x02, &[Ext::HopByHop, Ext::DestOpts]);
    assert_eq!(run(&syn), xdp_pass, "the burst's one SYN, behind extension headers");
    assert_eq!(run(&syn), xdp_drop, "a SYN over the rate, behind extension headers");
    // The program handle first, then lb (which detaches and unpins it).
    drop(prog);
    drop(lb);
}
