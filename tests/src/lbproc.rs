//! Runs the real `lb` binary with a generated config and tears it down.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// Which data plane (and path through it) a test asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Userspace,
    /// The kernel plane with the client side of every connection copied by
    /// the close watcher (as when a client closes during the splice), the
    /// server side spliced: `LB_TEST_COPY_CLIENT=1`.
    KernelCopyClient,
    /// The kernel plane without its `sock_ops` program, as where it cannot
    /// be attached: the workers insert every socket (`LB_TEST_NO_KERNEL_SETUP=1`).
    KernelUserSetup,
    /// The kernel plane with every frontend on the packet plane
    /// (`splice = "packet"`): connections are joined at packet level.
    Packet,
}

impl Mode {
    /// The `dataplane` this mode runs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kernel | Mode::KernelCopyClient | Mode::KernelUserSetup | Mode::Packet => "kernel",
            Mode::Userspace => "userspace",
        }
    }
    pub fn is_kernel(self) -> bool {
        self != Mode::Userspace
    }
    /// The name of the test module of this mode (`kernel`, `packet`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Userspace => "userspace",
            Mode::KernelCopyClient => "kernel_copy_client",
            Mode::KernelUserSetup => "kernel_user_setup",
            Mode::Packet => "packet",
        }
    }
    /// Top-level config keys this mode adds.
    pub fn config(self) -> &'static str {
        match self {
            Mode::Packet => "splice = \"packet\"\n",
            _ => "",
        }
    }
    /// Environment lb runs with in this mode.
    pub fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::KernelCopyClient => &[("LB_TEST_COPY_CLIENT", "1")],
            Mode::KernelUserSetup => &[("LB_TEST_NO_KERNEL_SETUP", "1")],
            _ => &[],
        }
    }
}

/// The `lb` binary: `$LB_BIN` (set by `cargo xtask test`) or the workspace's release build.
pub fn lb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_BIN") {
        // Tests run in their crate's directory; a relative path means the workspace's.
        let p = PathBuf::from(p);
        return if p.is_absolute() { p } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p) };
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("lb");
        if p.exists() {
            return p;
        }
    }
    panic!("lb binary not found: run `cargo xtask test` (or set LB_BIN)");
}

/// Whether the kernel data plane can run here. A missing prerequisite is a
/// failure, unless `LB_SKIP_KERNEL_TESTS=1` says to skip (never under
/// `CI=true`); a skip prints a `SKIP` line that `cargo xtask test` counts.
pub fn kernel_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")))
        .unwrap_or(false);
    let why = match (root, bpffs) {
        (true, true) => return true,
        (false, _) => "not running as root (the kernel data plane needs CAP_BPF + CAP_NET_ADMIN)",
        (_, false) => "bpffs is not mounted at /sys/fs/bpf (run `cargo xtask setup`)",
    };
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let opt_out = std::env::var("LB_SKIP_KERNEL_TESTS").as_deref() == Ok("1");
    if ci || !opt_out {
        panic!(
            "{test}: the kernel data plane cannot run here: {why}{}",
            if ci { " (required under CI=true)" } else { "; set LB_SKIP_KERNEL_TESTS=1 to skip kernel tests" }
        );
    }
    // Once per test (its thread), however often the test asks.
    thread_local!(static REPORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !REPORTED.replace(true) {
        println!("SKIP {test} [kernel]: {why}");
    }
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh scratch directory and a pin path, both unique to this call.
pub fn scratch() -> (PathBuf, PathBuf) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("lb-test-{}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    (dir, PathBuf::from("/sys/fs/bpf").join(&tag))
}

/// A running `lb run` process. Dropping it sends SIGTERM, waits, and removes
/// anything it left (config dir, pins).
pub struct Lb {
    child: Option<Child>,
    pub pid: u32,
    /// The first frontend's bound address.
    pub addr: SocketAddr,
    pub frontends: Vec<SocketAddr>,
    pub dataplane: String,
    /// Worker pids (one with `workers = 1`).
    pub workers: Vec<u32>,
    /// Holder pids, one per worker slot (they keep the spliced connections).
    pub holders: Vec<u32>,
    /// The metrics endpoint, when configured.
    pub metrics: Option<SocketAddr>,
    pub pin_path: PathBuf,
    /// Its `runtime_dir` (lock, metadata, control socket).
    pub run_dir: PathBuf,
    pub dir: PathBuf,
    /// The supervisor of the binary that took this instance over (`lb upgrade`).
    successor: Option<u32>,
    /// Holders whose supervisor this test killed ([`Lb::kill_supervisor`]),
    /// until an lb started again takes them over: ended when dropped.
    orphans: Vec<u32>,
}

/// How to start lb, beyond its config: for [`Lb::launch_as`].
#[derive(Default)]
pub struct Launch<'a> {
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// A command that runs lb (such as `setpriv … --`), before the binary.
    pub wrapper: Vec<String>,
    /// The binary (default: [`lb_bin`]).
    pub bin: Option<PathBuf>,
    /// The config's `runtime_dir` (default: /run/lb).
    pub run_dir: Option<PathBuf>,
}

impl Lb {
    /// Starts lb in `mode` with one frontend on 127.0.0.1:0 and one backend.
    /// Returns `None` only when the kernel plane is unavailable outside CI.
    pub fn start(mode: Mode, test: &str, servers: &[SocketAddr]) -> Option<Lb> {
        Self::start_with(mode, test, &Self::body(servers))
    }

    /// The config body of [`Self::start`]: frontend "t" on 127.0.0.1:0 to
    /// backend "b" with `servers` (prepend top-level keys such as `workers`).
    pub fn body(servers: &[SocketAddr]) -> String {
        let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "[[frontend]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\nservers = [{}]\n",
            list.join(", ")
        )
    }

    /// Starts lb with `body` (without `dataplane`/`pin_path`, which are added).
    pub fn start_with(mode: Mode, test: &str, body: &str) -> Option<Lb> {
        if mode.is_kernel() && !kernel_available(test) {
            return None;
        }
        let (dir, pin_path) = scratch();
        let cfg = format!(
            "dataplane = \"{}\"\npin_path = \"{}\"\n{}{body}",
            mode.as_str(),
            pin_path.display(),
            mode.config()
        );
        let lb = Self::launch_with(test, dir, pin_path, &cfg, mode.env());
        assert_eq!(lb.dataplane, mode.as_str(), "{test}: lb runs the wrong data plane");
        // A packet plane that could not start leaves its frontends on
        // sockmap: the test would prove the other plane.
        assert!(
            mode != Mode::Packet || lb.pinned_stats()["packet"].is_object(),
            "{test}: the packet plane did not start (its frontends fell back to sockmap; see lb's log)"
        );
        Some(lb)
    }

    /// Runs lb on the complete config `cfg` (its `pin_path` must be `pin_path`),
    /// keeping files in `dir`; waits until it announces readiness.
    pub fn launch(test: &str, dir: PathBuf, pin_path: PathBuf, cfg: &str) -> Lb {
        Self::launch_with(test, dir, pin_path, cfg, &[])
    }

    /// [`Self::launch`] with extra environment variables.
    pub fn launch_with(test: &str, dir: PathBuf, pin_path: PathBuf, cfg: &str, env: &[(&str, &str)]) -> Lb {
        Self::launch_as(test, dir, pin_path, cfg, Launch { env, ..Launch::default() })
    }

    /// [`Self::launch`] as `how` says (wrapped, another binary, another runtime_dir).
    pub fn launch_as(test: &str, dir: PathBuf, pin_path: PathBuf, cfg: &str, how: Launch<'_>) -> Lb {
        let cfg_path = dir.join("lb.toml");
        std::fs::write(&cfg_path, cfg).unwrap_or_else(|e| panic!("writing config: {e}"));
        let mut lb = Lb {
            child: None,
            pid: 0,
            addr: "0.0.0.0:0".parse().unwrap(),
            frontends: vec![],
            dataplane: String::new(),
            workers: vec![],
            holders: vec![],
            metrics: None,
            pin_path,
            run_dir: how.run_dir.clone().unwrap_or_else(|| PathBuf::from(lb_common::files::RUN_DIR)),
            dir,
            successor: None,
            orphans: vec![],
        };
        lb.spawn(test, how, false);
        lb
    }

    /// Starts `lb run --announce` on this instance's config file and waits
    /// for its ready line (its stderr goes to `<dir>/stderr`, appended to
    /// with `append`).
    fn spawn(&mut self, test: &str, how: Launch<'_>, append: bool) {
        let path = self.dir.join("stderr");
        if !append {
            std::fs::write(&path, "").expect("stderr file");
        }
        // O_APPEND: processes of an earlier `lb run` still write to it too.
        let stderr = std::fs::OpenOptions::new().append(true).open(&path).expect("stderr file");
        let bin = how.bin.unwrap_or_else(lb_bin);
        let mut cmd = match how.wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .args(["run", "--announce", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", std::env::var("LB_LOG").unwrap_or_else(|_| "info".into()))
            .env(NO_ERROR_BACKTRACE.0, NO_ERROR_BACKTRACE.1)
            .envs(how.env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        self.pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|_| panic!("{test}: lb did not announce readiness; stderr:\n{}", self.stderr()));
        self.dataplane = ready["dataplane"].as_str().unwrap_or_default().to_owned();
        self.metrics = ready["metrics"].as_str().and_then(|m| m.parse().ok());
        let pids = |key: &str| -> Vec<u32> {
            ready[key]
                .as_array()
                .map(|a| a.iter().filter_map(|w| w.as_u64().map(|p| p as u32)).collect())
                .unwrap_or_default()
        };
        self.workers = pids("workers");
        self.holders = pids("holders");
        self.frontends = ready["frontends"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f["listen"].as_str()?.parse().ok()).collect())
            .unwrap_or_default();
        self.addr = *self.frontends.first().unwrap_or_else(|| panic!("{test}: no frontend announced"));
    }

    /// Kills the supervisor with SIGKILL (a crash, the OOM killer) and
    /// waits for it; its workers die with it, its holders stay (they are
    /// ended when this is dropped, unless [`Self::restart`] took them over).
    pub fn kill_supervisor(&mut self) {
        let mut child = self.child.take().expect("kill_supervisor: no supervisor of this test's own");
        let _ = child.kill();
        let _ = child.wait();
        self.orphans = self.holders.clone();
    }

    /// Starts `lb run` again on the same config file (systemd's `Restart=`),
    /// with extra `env`, after [`Self::kill_supervisor`].
    pub fn restart(&mut self, test: &str, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "restart: the supervisor still runs");
        self.spawn(test, Launch { env, ..Launch::default() }, true);
        // Taken over, or stopped by the new lb (it says which in its log).
        self.orphans.clear();
    }

    /// The first worker's pid (the process that accepts and connects with
    /// one worker; its holder keeps the spliced connections).
    pub fn worker(&self) -> u32 {
        *self.workers.first().expect("lb announced no worker")
    }

    /// The supervisor, every worker and every holder.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.pid).chain(self.workers.iter().copied()).chain(self.holders.iter().copied()).collect()
    }

    /// The first slot's worker and holder: the processes one connection
    /// costs with `workers = 1`.
    pub fn slot0(&self) -> Vec<u32> {
        self.workers.iter().take(1).chain(self.holders.iter().take(1)).copied().collect()
    }

    /// The config file lb runs with (rewrite it, then `reload`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    /// Runs `lb ARGS --pin-path <this instance's>`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(lb_bin())
            .env(NO_ERROR_BACKTRACE.0, NO_ERROR_BACKTRACE.1)
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--runtime-dir")
            .arg(&self.run_dir)
            .output()
            .unwrap_or_else(|e| panic!("running lb {args:?}: {e}"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// Like [`Self::cli`], but the command must succeed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "lb {args:?} failed: {err}");
        out
    }

    /// What lb wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Waits up to `within` until no connection is counted active and
    /// `LB_CONN` is empty: every connection ended and counted once.
    pub async fn all_ended(&self, within: std::time::Duration) -> bool {
        crate::retry_until(within, || {
            let s = self.pinned_stats();
            (s["totals"]["active"].as_u64()? == 0 && s["counters"]["conn_entries"].as_u64()? == 0).then_some(())
        })
        .await
        .is_some()
    }

    /// `n` connections are counted active (within 5 s) and `lb conns`
    /// lists `n` joined on the packet plane; panics naming `when` otherwise.
    pub async fn assert_joined_live(&self, n: u64, when: &str) {
        let counted = crate::retry_until(Duration::from_secs(5), || {
            (self.pinned_stats()["totals"]["active"].as_u64()? == n).then_some(())
        })
        .await;
        assert!(counted.is_some(), "want {n} active connections {when}: {}", self.pinned_stats());
        let rows: serde_json::Value = serde_json::from_str(&self.ctl(&["conns", "--json"])).unwrap();
        let packet = rows.as_array().map_or(0, |r| r.iter().filter(|r| r["plane"] == "packet").count());
        assert_eq!(packet as u64, n, "lb conns lists every joined connection {when}");
    }

    /// `lb stats --json` against this instance's pins (kernel mode).
    pub fn pinned_stats(&self) -> serde_json::Value {
        let out = Command::new(lb_bin())
            .env(NO_ERROR_BACKTRACE.0, NO_ERROR_BACKTRACE.1)
            .args(["stats", "--json", "--pin-path"])
            .arg(&self.pin_path)
            .arg("--runtime-dir")
            .arg(&self.run_dir)
            .output()
            .expect("running lb stats");
        assert!(out.status.success(), "lb stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("lb stats --json output is JSON")
    }

    /// Waits until every worker published once more after this call (each
    /// publishes every 100 ms), so the pinned counters include everything
    /// that happened before it.
    pub fn await_publication(&self) {
        let seqs = |s: &serde_json::Value| -> Vec<u64> {
            s["workers"].as_array().map(|w| w.iter().filter_map(|w| w["seq"].as_u64()).collect()).unwrap_or_default()
        };
        // A full publication that starts after now ends at the next even
        // value past the current one, plus two.
        let want: Vec<u64> = seqs(&self.pinned_stats()).iter().map(|s| s.div_ceil(2) * 2 + 2).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = seqs(&self.pinned_stats());
            if now.len() >= want.len() && now.iter().zip(&want).all(|(n, w)| n >= w) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "workers did not publish within 5 s: {now:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The new supervisor's pid in what `lb upgrade` answered (and logged):
    /// "… new supervisor pid N, …".
    pub fn upgraded_pid(answer: &str) -> Option<u32> {
        answer.split("new supervisor pid ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// `lb upgrade` handed this instance to the supervisor `pid` (of
    /// another binary): the one this test started has exited; from now on
    /// [`Self::stop`] ends the new one.
    pub fn upgraded_to(&mut self, pid: u32) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.successor = Some(pid);
        self.pid = pid;
    }

    /// Sends SIGTERM and waits for exit; returns whether it exited 0 (for
    /// a successor, which is not our child: whether it is gone).
    pub fn stop(&mut self) -> bool {
        if let Some(pid) = self.successor.take() {
            // SAFETY: signalling the lb this test started, as it is now.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            for _ in 0..1200 {
                if !crate::alive(pid) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return false;
        }
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        // Up to 30 s: an lb holding tens of thousands of connections closes them all.
        for _ in 0..1200 {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

/// lb's errors without the backtrace `RUST_BACKTRACE` (CI sets it) would
/// add to each (anyhow reads `RUST_LIB_BACKTRACE` first): a failing
/// test's output, and the tail of lb's log it prints, end with what went
/// wrong rather than with stack frames. Panics keep theirs.
const NO_ERROR_BACKTRACE: (&str, &str) = ("RUST_LIB_BACKTRACE", "0");

impl Drop for Lb {
    fn drop(&mut self) {
        self.stop();
        // Holders left by a supervisor this test killed, not taken over
        // since: they are this test's (checked by their executable).
        for p in std::mem::take(&mut self.orphans) {
            if crate::alive(p) && crate::exe(p).is_some_and(|e| e.file_name() == lb_bin().file_name()) {
                // SAFETY: signalling a process of the lb this test started.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- lb (pid {}) stderr, last lines ---", self.pid);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.pin_path.exists() {
            for e in std::fs::read_dir(&self.pin_path).into_iter().flatten().flatten() {
                let _ = std::fs::remove_file(e.path());
            }
            let _ = std::fs::remove_dir(&self.pin_path);
        }
        // What lb keeps in its runtime_dir for this pin path (left behind if it was killed).
        for ext in lb_common::files::EXTENSIONS.into_iter().chain(["sock.lock"]) {
            let _ = std::fs::remove_file(lb_common::files::run_file(&self.run_dir, &self.pin_path, ext));
        }
        for i in 0..self.holders.len() as u16 {
            let _ = std::fs::remove_file(lb_common::files::holder_socket(&self.run_dir, &self.pin_path, i));
            let _ = std::fs::remove_file(lb_common::files::holder_lock(&self.run_dir, &self.pin_path, i));
            let _ = std::fs::remove_file(lb_common::files::holder_beat(&self.run_dir, &self.pin_path, i));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Proof, from the pinned maps, that the kernel data plane carried a test's
/// bytes: counters read at [`KernelProof::start`] and compared at the end.
/// On the userspace plane every check passes (there is nothing to prove).
pub struct KernelProof {
    kernel: bool,
    at_start: Counts,
}

/// The pinned counters a proof compares, from one `lb stats --json`.
#[derive(Clone, Copy, Default)]
struct Counts {
    skbs: u64,
    fallbacks: u64,
    /// Server sockets the `sock_ops` program spliced at `ESTABLISHED`.
    setups: u64,
    /// The packet plane runs: packets its program rewrote, connections
    /// joined, connections it tried to join and kept on sockmap.
    packet: bool,
    rewritten: u64,
    joined: u64,
    kept: u64,
}

/// The reasons `lb stats` gives for a connection of a packet-plane
/// frontend kept on sockmap (`packet_kept_<reason>`).
pub const PACKET_KEPT_REASONS: [&str; 6] = ["timestamps", "mss", "closed", "busy", "map", "path"];

fn kernel_counters(lb: &Lb) -> Counts {
    let s = lb.pinned_stats();
    let get = |section: &str, key: &str| {
        s[section][key].as_u64().unwrap_or_else(|| panic!("{section}.{key} in lb stats --json: {s}"))
    };
    Counts {
        skbs: get("counters", "skbs_redirected"),
        fallbacks: get("totals", "userspace_fallbacks"),
        setups: get("counters", "kernel_setups"),
        packet: s["packet"].is_object(),
        // A reset lb's own socket sent, moved by the program, is the only
        // packet of a connection that ended while it was joined.
        rewritten: s["packet"]["rewritten"].as_u64().unwrap_or(0) + s["packet"]["turned"].as_u64().unwrap_or(0),
        joined: s["totals"]["packet_joined"].as_u64().unwrap_or(0),
        kept: PACKET_KEPT_REASONS.iter().map(|r| s["totals"][format!("packet_kept_{r}")].as_u64().unwrap_or(0)).sum(),
    }
}

impl KernelProof {
    pub fn start(lb: &Lb) -> KernelProof {
        if lb.dataplane != "kernel" {
            return KernelProof { kernel: false, at_start: Counts::default() };
        }
        KernelProof { kernel: true, at_start: kernel_counters(lb) }
    }

    /// How many connections since the start the packet plane joined.
    pub fn joined(&self, lb: &Lb) -> u64 {
        lb.await_publication();
        kernel_counters(lb).joined - self.at_start.joined
    }

    /// Waits up to `within` until `n` connections since the start are
    /// joined; panics naming `test` otherwise.
    pub async fn await_joined(&self, lb: &Lb, n: u64, within: Duration, test: &str) {
        let joined = crate::retry_until(within, || (self.joined(lb) >= n).then_some(())).await;
        assert!(joined.is_some(), "{test}: {} of {n} connections joined", self.joined(lb));
    }

    /// How many connections since the start the `sock_ops` program set up
    /// in the kernel (spliced their server at `ESTABLISHED`).
    pub fn kernel_setups(&self, lb: &Lb) -> u64 {
        if !self.kernel {
            return 0;
        }
        kernel_counters(lb).setups - self.at_start.setups
    }

    /// The eBPF verdict redirected skbs since the start: the kernel path ran
    /// (some connections may still have been served by the userspace copy).
    pub fn assert_kernel_ran(&self, lb: &Lb, test: &str) -> u64 {
        if !self.kernel {
            return 0;
        }
        let (mut now, then) = (kernel_counters(lb), self.at_start);
        if now.packet {
            // Joins are counted by the workers, published every 100 ms.
            lb.await_publication();
            now = kernel_counters(lb);
            // Every connection went through a join: joined (the TC program
            // rewrote its packets), or kept on sockmap for a counted reason
            // (a short one often ends before its join does).
            let (joined, kept) = (now.joined - then.joined, now.kept - then.kept);
            let (rewritten, skbs) = (now.rewritten - then.rewritten, now.skbs - then.skbs);
            assert!(
                joined + kept > 0 && rewritten + skbs > 0,
                "{test}: the packet plane joined {joined} and kept {kept} connection(s), rewrote {rewritten} \
                 packet(s) and the verdict redirected {skbs} skb(s): it did not run"
            );
            assert!(joined == 0 || rewritten > 0, "{test}: {joined} joined, but no packet rewritten");
            let s = lb.pinned_stats();
            let reasons: Vec<String> = PACKET_KEPT_REASONS
                .iter()
                .map(|r| format!("{r} {}", s["totals"][format!("packet_kept_{r}")]))
                .collect();
            eprintln!(
                "[packet] {test}: {joined} joined, {kept} kept on sockmap ({}), {rewritten} packets rewritten",
                reasons.join(", ")
            );
            return rewritten.max(skbs);
        }
        assert!(now.skbs > then.skbs, "{test}: the eBPF verdict redirected nothing: the kernel path did not run");
        eprintln!(
            "[kernel] {test}: {} skbs redirected in the kernel, {} connection(s) served by the userspace copy",
            now.skbs - then.skbs,
            now.fallbacks - then.fallbacks
        );
        now.skbs - then.skbs
    }

    /// Every connection since the start was spliced in the kernel: the
    /// verdict ran and no connection fell back to the userspace copy
    /// (counts are published every 100 ms, so this waits for a publication).
    pub fn assert_all_spliced(&self, lb: &Lb, test: &str) {
        if !self.kernel {
            return;
        }
        self.assert_kernel_ran(lb, test);
        lb.await_publication();
        let fell_back = kernel_counters(lb).fallbacks - self.at_start.fallbacks;
        assert_eq!(
            fell_back, 0,
            "{test}: {fell_back} connection(s) fell back to the userspace copy instead of the kernel splice"
        );
    }
}
