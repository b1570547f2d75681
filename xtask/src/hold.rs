//! `cargo xtask hold`: how many concurrent connections one backend
//! `ip:port` takes through lb on this machine, with the default port range.
//!
//! Backend sinks, lb (with workers and a source pool) and client holders
//! are separate processes, so none needs more than ~15,000 descriptors.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use testkit::{Lb, lbproc};

/// Connections one holder process opens at most, all from its one source
/// address to one target. Below half the ephemeral range on purpose:
/// `connect()` tries the ports of one parity first (`__inet_hash_connect`),
/// and once they are all in use for a 4-tuple every further connect walks
/// all of them before it tries the other half (15,000 per address made the
/// load tool itself the bottleneck: 86 % of the machine in
/// `__inet_check_established`).
const PER_HOLDER: usize = 12_000;
/// Connections one lb worker takes at most (two descriptors each, 20000 limit).
const PER_WORKER: usize = 8_000;
/// The same on the packet plane, where a joined connection holds no
/// descriptor: only those being set up or kept on sockmap hold two.
const PER_PACKET_WORKER: usize = 16_000;

pub struct Args {
    pub conns: usize,
    pub pool: usize,
    pub dataplane: String,
    /// Upgrade lb once the connections are held.
    pub upgrade: bool,
    /// Print the slab caches that grew, per connection held.
    pub slab: bool,
}

/// A started helper that prints one JSON line; killed (by its pid) on drop.
pub struct Helper {
    child: Child,
}

impl Helper {
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<(Helper, Value)> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("{args:?} printed {line:?}"))?;
        Ok((Helper { child }, v))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoing `lb-hold sink` processes sharing one port (SO_REUSEPORT), enough
/// for `conns` connections without any passing the open-files limit.
pub fn sinks(hold_bin: &Path, conns: usize) -> anyhow::Result<(Vec<Helper>, SocketAddr)> {
    let (first, v) = Helper::start(hold_bin, &["sink", "--listen", "127.0.0.1:0"])?;
    let addr: SocketAddr = v["listen"].as_str().context("sink address")?.parse()?;
    let mut all = vec![first];
    for _ in 1..conns.div_ceil(PER_HOLDER) {
        all.push(Helper::start(hold_bin, &["sink", "--listen", &addr.to_string()])?.0);
    }
    Ok((all, addr))
}

/// Idle connections held by `lb-hold clients` processes, at most
/// [`PER_HOLDER`] each, each from its own source address (127.0.3.x).
pub struct Held {
    /// Dropping them closes every connection.
    pub holders: Vec<Helper>,
    pub ok: u64,
    pub failed: u64,
    /// The first error of each holder that had one.
    pub errors: Vec<String>,
}

/// Opens `n` connections to `target`, all holders at once; returns when all are up or failed.
pub fn hold_clients(hold_bin: &Path, target: SocketAddr, n: usize) -> anyhow::Result<Held> {
    let holders_n = n.div_ceil(PER_HOLDER);
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..holders_n {
        let count = (n / holders_n + usize::from(i < n % holders_n)).to_string();
        let src = format!("127.0.3.{}", i + 1);
        let (target, bin, tx) = (target.to_string(), hold_bin.to_owned(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(Helper::start(&bin, &["clients", "--target", &target, "--src", &src, "--count", &count]));
        });
    }
    drop(tx);
    let mut held = Held { holders: Vec::new(), ok: 0, failed: 0, errors: Vec::new() };
    for r in rx {
        let (h, v) = r?;
        held.ok += v["ok"].as_u64().unwrap_or(0);
        held.failed += v["failed"].as_u64().unwrap_or(0);
        if let Some(e) = v["error"].as_str() {
            held.errors.push(e.to_owned());
        }
        held.holders.push(h);
    }
    Ok(held)
}

fn rss_kb(pid: u32) -> u64 {
    testkit::status_kb(pid, "VmRSS")
}

pub fn hold(lb_bin: &Path, hold_bin: &Path, a: &Args) -> anyhow::Result<Value> {
    // SAFETY: setting an env var before any thread is started.
    unsafe { std::env::set_var("LB_BIN", lb_bin) };
    let per_pair =
        u64::from(lb_common::host::ephemeral_ports().context("reading net.ipv4.ip_local_port_range: no valid range")?);
    println!("ephemeral range: {per_pair} ports per source address and server");

    let (sinks, backend) = sinks(hold_bin, a.conns)?;
    println!("backend {backend}: {} sink process(es) sharing it with SO_REUSEPORT", sinks.len());
    if a.dataplane == "direct" {
        return direct(hold_bin, backend, a, sinks);
    }

    let per_worker = if a.dataplane == "packet" { PER_PACKET_WORKER } else { PER_WORKER };
    let workers = a.conns.div_ceil(per_worker).max(1);
    let pool: Vec<String> = (1..=a.pool).map(|i| format!("\"127.0.1.{i}\"")).collect();
    let (dir, pin_path) = lbproc::scratch();
    let maxconn = workers * (per_worker + per_worker / 8);
    // The kernel maps take about 2.8 KiB per connection and 4.5 MiB per
    // worker for the clients its listener's backlog may hold (README,
    // "Kernel memory").
    // The packet plane's flows add about 1.5 KiB more.
    let per_conn: u64 = if a.dataplane == "packet" { 9 * 512 } else { 3 * 1024 };
    let kernel_memory = ((maxconn as u64 * per_conn + workers as u64 * (5 << 20)) >> 20) + 64;
    // `packet`: the kernel plane with every connection joined at packet level.
    let (dataplane, splice) =
        if a.dataplane == "packet" { ("kernel", "splice = \"packet\"\n") } else { (a.dataplane.as_str(), "") };
    let cfg = format!(
        "dataplane = \"{dataplane}\"\n{splice}pin_path = \"{}\"\nworkers = {workers}\nmaxconn = {maxconn}\n\
         kernel_memory = \"{kernel_memory}MiB\"\n\n\
         [[frontend]]\nname = \"hold\"\nlisten = \"127.0.0.1:0\"\nbackend = \"one\"\n\n\
         [[backend]]\nname = \"one\"\nservers = [\"{backend}\"]\nsource_pool = [{}]\n",
        pin_path.display(),
        pool.join(", ")
    );
    let mut lb = Lb::launch("hold", dir, pin_path, &cfg);
    let pids: Vec<u32> = lb.pids();
    let rss0: u64 = pids.iter().map(|p| rss_kb(*p)).sum();
    let mem0 = testkit::tcp_mem_pages();
    println!("lb: {workers} workers, data plane {}, source pool of {}", lb.dataplane, a.pool);

    let slab0 = a.slab.then(slabs);
    let t0 = Instant::now();
    let fill = Fill::start(4);
    let held = hold_clients(hold_bin, lb.addr, a.conns)?;
    let curve = fill.curve(a.conns);
    if let Some(s0) = &slab0 {
        // The workers hand their connections to the holders: let them finish.
        std::thread::sleep(std::time::Duration::from_millis(500));
        print_slab_growth(s0, held.ok);
    }
    for e in &held.errors {
        println!("  holder error: {e}");
    }
    if held.failed > 0 {
        let log = lb.stderr();
        let mut said: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        said.dedup_by_key(|l| l.split_once("] ").map_or(*l, |x| x.1));
        for l in said.iter().take(10) {
            println!("  lb said: {l}");
        }
    }
    let (ok, failed, holders) = (held.ok, held.failed, held.holders);
    let secs = t0.elapsed().as_secs_f64();
    // The workers publish their counts every 100 ms: wait for them to catch up.
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    let s = loop {
        let s = lb.pinned_stats();
        if s["totals"]["active"].as_u64() == Some(ok) || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let rss1: u64 = pids.iter().map(|p| rss_kb(*p)).sum();
    let mem1 = testkit::tcp_mem_pages();
    let ss_count = established(&backend)?;
    let active = s["totals"]["active"].as_u64().unwrap_or(0);
    println!("== {ok} connections held through lb to {backend} ({failed} failed) in {secs:.1}s");
    println!("  lb active (maps)           {active}");
    if let Some(j) = s["totals"]["packet_joined"].as_u64().filter(|_| a.dataplane == "packet") {
        println!("  joined (packet plane)      {j}");
        let kept: Vec<String> = ["timestamps", "mss", "closed", "busy", "map", "path"]
            .iter()
            .map(|r| format!("{r} {}", s["totals"][format!("packet_kept_{r}")].as_u64().unwrap_or(0)))
            .collect();
        println!("  kept on sockmap            {}", kept.join(", "));
    }
    println!("  reset for lack of descriptors or memory (no_local_resources) {}", s["totals"]["no_local_resources"]);
    println!("  established to {backend} (ss) {ss_count}");
    for src in s["sources"].as_array().into_iter().flatten() {
        println!(
            "  from {:<12} ports in use {:>6}, exhausted {}",
            src["ip"].as_str().unwrap_or("?"),
            src["ports_in_use"],
            src["exhausted"]
        );
    }
    let per_conn_rss = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / ok.max(1) as f64;
    let per_conn_kernel = (mem1.saturating_sub(mem0)) as f64 * 4096.0 / ok.max(1) as f64;
    println!("  lb RSS {rss0} -> {rss1} KiB over {} processes: {per_conn_rss:.0} B per connection", pids.len());
    println!("  kernel TCP memory {mem0} -> {mem1} pages: {per_conn_kernel:.0} B per connection (all four sockets)");
    let single_limit = per_pair;
    println!(
        "  single source address limit {single_limit}: {}",
        if ok > single_limit { "exceeded" } else { "NOT exceeded" }
    );
    print_curve(&curve);
    let upgraded = if a.upgrade { Some(upgrade(&mut lb, lb_bin, &backend, ok)?) } else { None };
    let out = serde_json::json!({
        "conns_requested": a.conns, "held": ok, "failed": failed, "setup_secs": secs,
        "lb_active": active, "ss_established": ss_count, "workers": workers, "pool": a.pool,
        "dataplane": lb.dataplane, "per_pair_ports": per_pair,
        "rss_bytes_per_conn": per_conn_rss, "kernel_bytes_per_conn": per_conn_kernel,
        "sources": s["sources"].clone(), "upgrade": upgraded, "fill": curve,
    });
    drop(holders);
    let clean = lb.stop();
    drop(sinks);
    if !clean {
        bail!("lb did not stop cleanly");
    }
    if failed > 0 || active != ok {
        bail!("{failed} connections failed; maps count {active} of {ok}");
    }
    Ok(out)
}

/// The same clients straight to the sinks: the floor lb's setup rate is
/// compared with.
fn direct(hold_bin: &Path, backend: SocketAddr, a: &Args, sinks: Vec<Helper>) -> anyhow::Result<Value> {
    let conns = a.conns;
    let slab0 = a.slab.then(slabs);
    let t0 = Instant::now();
    let fill = Fill::start(2);
    let held = hold_clients(hold_bin, backend, conns)?;
    let curve = fill.curve(conns);
    if let Some(s0) = &slab0 {
        print_slab_growth(s0, held.ok);
    }
    let secs = t0.elapsed().as_secs_f64();
    for e in &held.errors {
        println!("  holder error: {e}");
    }
    println!("== {} connections held directly to {backend} ({} failed) in {secs:.1}s", held.ok, held.failed);
    print_curve(&curve);
    let failed = held.failed;
    drop(held);
    drop(sinks);
    if failed > 0 {
        bail!("{failed} connections failed");
    }
    Ok(serde_json::json!({ "held": conns, "setup_secs": secs, "dataplane": "direct", "fill": curve }))
}

/// Bytes in use per slab cache (`/proc/slabinfo`: active objects × size).
pub fn slabs() -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((w.first()?.to_string(), w.get(1)?.parse::<u64>().ok()? * w.get(3)?.parse::<u64>().ok()?))
        })
        .collect()
}

/// The caches that grew by at least 16 bytes per connection since `before`.
fn print_slab_growth(before: &std::collections::BTreeMap<String, u64>, conns: u64) {
    let after = slabs();
    let mut grew: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), (*v as f64 - *before.get(k).unwrap_or(&0) as f64) / conns.max(1) as f64))
        .filter(|(_, per)| *per >= 16.0)
        .collect();
    grew.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = grew.iter().map(|g| g.1).sum();
    println!("  slab growth per connection held: {total:.0} B in caches that grew by 16 B or more");
    for (name, per) in grew {
        println!("    {name:<24} {per:>7.0} B");
    }
}

/// The machine's TCP sockets in use (`/proc/net/sockstat`), sampled while
/// connections are opened: how fast they came as the count grew.
struct Fill {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    samples: std::thread::JoinHandle<Vec<(f64, u64)>>,
    /// Sockets one held connection adds (2 direct: client and sink; 4 through lb).
    per_conn: u64,
}

impl Fill {
    fn start(per_conn: u64) -> Fill {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let samples = std::thread::spawn(move || {
            let (t0, base) = (Instant::now(), testkit::sockstat_tcp("inuse"));
            let sample = || (t0.elapsed().as_secs_f64(), testkit::sockstat_tcp("inuse").saturating_sub(base));
            let mut v = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                v.push(sample());
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            v.push(sample());
            v
        });
        Fill { stop, samples, per_conn }
    }

    /// For each tenth of `n`: connections held by then, and the rate (per
    /// second) at which that tenth came.
    fn curve(self, n: usize) -> Vec<Value> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.samples.join().unwrap_or_default();
        let mut out = Vec::new();
        let mut last_t = 0.0;
        for tenth in 1..=10u64 {
            let want = n as u64 * tenth / 10;
            let Some(&(t, _)) = samples.iter().find(|(_, socks)| socks / self.per_conn >= want) else { break };
            let rate = (n as f64 / 10.0) / (t - last_t).max(0.2);
            out.push(serde_json::json!({ "held": want, "secs": t, "per_sec": rate.round() }));
            last_t = t;
        }
        out
    }
}

fn print_curve(curve: &[Value]) {
    let row: Vec<String> = curve
        .iter()
        .map(|c| format!("{}k {:.0}/s", c["held"].as_u64().unwrap_or(0) / 1000, c["per_sec"].as_f64().unwrap_or(0.0)))
        .collect();
    println!("  fill (connections held: rate of that tenth): {}", row.join(", "));
}

/// Established connections to `backend`, by `ss`.
fn established(backend: &SocketAddr) -> anyhow::Result<usize> {
    let ss = Command::new("ss").args(["-Htn", "state", "established", "dst", &backend.to_string()]).output()?;
    Ok(String::from_utf8_lossy(&ss.stdout).lines().count())
}

/// `lb upgrade` (to the binary at the same path, read again) with `held`
/// connections: how long it took, and how many connections were lost (the
/// maps' count and the backend's established sockets, before and after).
fn upgrade(lb: &mut Lb, lb_bin: &Path, backend: &SocketAddr, held: u64) -> anyhow::Result<Value> {
    let before = established(backend)?;
    let t0 = Instant::now();
    let out = Command::new(lb_bin)
        .args(["upgrade", "--pin-path"])
        .arg(&lb.pin_path)
        .arg("--runtime-dir")
        .arg(&lb.run_dir)
        .output()?;
    let secs = t0.elapsed().as_secs_f64();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        bail!("lb upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pid = Lb::upgraded_pid(&answer).context("no new pid in lb upgrade's answer")?;
    lb.upgraded_to(pid);
    // The new workers publish within 100 ms.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let active = lb.pinned_stats()["totals"]["active"].as_u64().unwrap_or(0);
    let after = established(backend)?;
    let lost = held.saturating_sub(active).max(before.saturating_sub(after) as u64);
    println!("== lb upgrade with {held} connections held: {secs:.2}s, {lost} lost ({answer})");
    println!("  established to {backend} (ss) {before} -> {after}; lb active (maps) {active}");
    Ok(serde_json::json!({ "secs": secs, "lost": lost, "established_before": before, "established_after": after,
        "active_after": active }))
}

pub fn build_hold() -> anyhow::Result<PathBuf> {
    // lb-xdp-flood sits beside it (the guard's figure in the bench).
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "tests",
        "--bin",
        "lb-hold",
        "--bin",
        "lb-xdp-flood",
    ]))?;
    Ok(crate::workspace_root().join("target/release/lb-hold"))
}
