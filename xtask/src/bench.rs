//! `cargo xtask bench`: lb against a direct connection, HAProxy and nginx,
//! measured side by side in one run. Systems alternate within every round
//! (A B C … A B C …); the first round is a warm-up and is not counted.
//!
//! Results go to `bench/results/` as JSON, a markdown table and PNG plots.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testkit::{Lb, lbproc};

use crate::hold::{Helper, hold_clients, sinks};

/// One system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    Direct,
    LbKernel,
    LbUserspace,
    Haproxy,
    HaproxySplice,
    Nginx,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::LbKernel => "lb-kernel",
            Self::LbUserspace => "lb-userspace",
            Self::Haproxy => "haproxy",
            Self::HaproxySplice => "haproxy-splice",
            Self::Nginx => "nginx",
        }
    }
    const ALL: [System; 6] =
        [Self::Direct, Self::LbKernel, Self::LbUserspace, Self::Haproxy, Self::HaproxySplice, Self::Nginx];
}

pub struct Opts {
    pub smoke: bool,
    /// Only these scenarios (empty: all).
    pub only: Vec<String>,
    pub runs: usize,
    pub secs: f64,
    pub conns: usize,
    pub out: PathBuf,
}

impl Opts {
    /// Every scenario (or `only`) briefly: the `--smoke` run of `cargo xtask test` and `bench`.
    pub fn smoke(only: Vec<String>) -> Self {
        Self {
            smoke: true,
            only,
            runs: 1,
            secs: 0.3,
            conns: 300,
            out: crate::workspace_root().join("target/bench-smoke"),
        }
    }
}

/// Connections one single-process proxy holds at most under the 20000-fd limit.
const SINGLE_PROCESS_CAP: usize = 9_000;

/// A running proxy (or none, for direct).
struct Proxy {
    addr: SocketAddr,
    lb: Option<Lb>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Proxy {
    /// Every process of the proxy (nginx and lb workers included).
    fn pids(&self) -> Vec<u32> {
        if let Some(lb) = &self.lb {
            return std::iter::once(lb.pid).chain(lb.workers.iter().copied()).collect();
        }
        match &self.child {
            Some(c) => {
                let mut v = vec![c.id()];
                v.extend(children(c.id()));
                v
            }
            None => vec![],
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a process this bench started, by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(self.lb.take());
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; after the ")" they are at 11 and 12.
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on {addr} within 10 s")
}

fn tmpdir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("lb-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Starts `sys` in front of `backend`. `hold`: sized for many idle connections.
fn start(sys: System, backend: SocketAddr, hold: Option<usize>) -> anyhow::Result<Proxy> {
    match sys {
        System::Direct => Ok(Proxy { addr: backend, lb: None, child: None, dir: None }),
        System::LbKernel | System::LbUserspace => {
            let plane = if sys == System::LbKernel { "kernel" } else { "userspace" };
            let (dir, pin_path) = lbproc::scratch();
            let (workers, pool) = match hold {
                Some(n) => (
                    n.div_ceil(8_000).max(1),
                    "source_pool = [\"127.0.1.1\", \"127.0.1.2\", \"127.0.1.3\", \"127.0.1.4\"]",
                ),
                None => (1, ""),
            };
            let cfg = format!(
                "dataplane = \"{plane}\"\npin_path = \"{}\"\nworkers = {workers}\nmaxconn = {}\naccess_log = false\n\n\
                 [[frontend]]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\nbackend = \"sink\"\n\n\
                 [[backend]]\nname = \"sink\"\nservers = [\"{backend}\"]\n{pool}\n",
                pin_path.display(),
                workers * 9_000
            );
            let lb = Lb::launch("bench", dir, pin_path, &cfg);
            if lb.dataplane != plane {
                bail!("lb started the {} data plane, not {plane}", lb.dataplane);
            }
            Ok(Proxy { addr: lb.addr, lb: Some(lb), child: None, dir: None })
        }
        System::Haproxy | System::HaproxySplice => {
            let dir = tmpdir(sys.name())?;
            let addr = free_port()?;
            let splice = if sys == System::HaproxySplice { "    option splice-auto\n" } else { "" };
            let cfg = format!(
                "global\n    nbthread 2\n    maxconn {SINGLE_PROCESS_CAP}\n    maxpipes 500\n\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n{splice}\n\
                 frontend f\n    bind {addr}\n    default_backend b\n\n\
                 backend b\n    server s1 {backend}\n"
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            let log = dir.join("stderr");
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&path).stderr(std::fs::File::create(&log)?);
            external("haproxy", cmd, addr, dir, &log)
        }
        System::Nginx => {
            let dir = tmpdir("nginx")?;
            let addr = free_port()?;
            let cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
                 error_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 19000; }}\n\
                 stream {{\n  server {{\n    listen {addr} reuseport;\n    proxy_pass {backend};\n    proxy_timeout 1h;\n    proxy_half_close on;\n  }}\n}}\n",
                d = dir.display()
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, cfg)?;
            let log = dir.join("error.log");
            let mut cmd = Command::new("nginx");
            cmd.arg("-p").arg(&dir).arg("-e").arg(&log).arg("-c").arg(&path).stderr(Stdio::null());
            external("nginx", cmd, addr, dir, &log)
        }
    }
}

/// Starts a third-party proxy (`what`) that will listen on `addr`; on
/// failure the error carries its log. `dir` is removed when it stops.
fn external(what: &str, mut cmd: Command, addr: SocketAddr, dir: PathBuf, log: &Path) -> anyhow::Result<Proxy> {
    let child =
        cmd.stdout(Stdio::null()).spawn().with_context(|| format!("starting {what} (run `cargo xtask setup`)"))?;
    let p = Proxy { addr, lb: None, child: Some(child), dir: Some(dir) };
    wait_listening(addr, what).with_context(|| std::fs::read_to_string(log).unwrap_or_default())?;
    Ok(p)
}

/// Runs the load generator and returns its JSON line.
fn client(bin: &Path, args: &[String]) -> anyhow::Result<Value> {
    let out = Command::new(bin).args(args).output().with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("lb-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One measurement: metric name -> value.
type Sample = BTreeMap<String, f64>;

fn measure_throughput(
    bench: &Path,
    target: SocketAddr,
    pids: &[u32],
    streams: usize,
    secs: f64,
) -> anyhow::Result<Sample> {
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let v = client(
        bench,
        &[
            "throughput",
            "--target",
            &target.to_string(),
            "--streams",
            &streams.to_string(),
            "--secs",
            &secs.to_string(),
        ]
        .map(String::from),
    )?;
    let cpu = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu0;
    if v["errors"].as_u64() != Some(0) {
        bail!("throughput through {target}: {v}");
    }
    let bytes = v["bytes"].as_f64().unwrap_or(0.0);
    let mut s = Sample::new();
    s.insert("gbit_per_s".into(), v["gbit_per_s"].as_f64().unwrap_or(0.0));
    if !pids.is_empty() {
        s.insert("cpu_s_per_gib".into(), cpu / (bytes / (1u64 << 30) as f64));
    }
    Ok(s)
}

fn measure_pingpong(bench: &Path, target: SocketAddr, secs: f64) -> anyhow::Result<Sample> {
    let v =
        client(bench, &["pingpong", "--target", &target.to_string(), "--secs", &secs.to_string()].map(String::from))?;
    Ok(["avg_us", "p50_us", "p99_us", "p999_us"]
        .iter()
        .map(|k| (k.to_string(), v[*k].as_f64().unwrap_or(0.0)))
        .collect())
}

fn measure_connrate(bench: &Path, target: SocketAddr, pids: &[u32], secs: f64) -> anyhow::Result<Sample> {
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let v = client(
        bench,
        &["connrate", "--target", &target.to_string(), "--secs", &secs.to_string(), "--concurrency", "16"]
            .map(String::from),
    )?;
    let cpu = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu0;
    if v["errors"].as_u64().unwrap_or(0) > 0 {
        bail!("connection rate through {target}: {v}");
    }
    let mut s: Sample = [("conns_per_s".to_string(), v["per_s"].as_f64().unwrap_or(0.0))].into_iter().collect();
    if let Some(n) = v["conns"].as_f64().filter(|n| *n > 0.0 && !pids.is_empty()) {
        s.insert("cpu_us_per_conn".into(), cpu * 1e6 / n);
    }
    Ok(s)
}

fn slab_kb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("Slab:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Opens `n` idle connections through `proxy` from holder processes.
fn measure_idle(hold: &Path, proxy: &Proxy, n: usize) -> anyhow::Result<Sample> {
    let pids = proxy.pids();
    let rss = |pids: &[u32]| pids.iter().map(|p| testkit::status_kb(*p, "VmRSS") as f64).sum::<f64>();
    let (rss0, slab0) = (rss(&pids), slab_kb());
    let t0 = Instant::now();
    let held = hold_clients(hold, proxy.addr, n)?;
    let ok = held.ok;
    let setup = t0.elapsed().as_secs_f64();
    // Let the proxies settle their per-connection state.
    std::thread::sleep(Duration::from_millis(500));
    let pids = proxy.pids();
    let (rss1, slab1) = (rss(&pids), slab_kb());
    drop(held);
    if ok as usize != n {
        bail!("only {ok} of {n} idle connections got through {}", proxy.addr);
    }
    let mut s = Sample::new();
    s.insert("held".into(), ok as f64);
    s.insert("setup_s".into(), setup);
    s.insert("rss_bytes_per_conn".into(), (rss1 - rss0).max(0.0) * 1024.0 / n as f64);
    s.insert("kernel_bytes_per_conn".into(), (slab1 - slab0).max(0.0) * 1024.0 / n as f64);
    Ok(s)
}

/// Scenario name, systems it runs on.
fn scenarios() -> Vec<(&'static str, Vec<System>)> {
    let proxies: Vec<System> = System::ALL.iter().copied().filter(|s| *s != System::Direct).collect();
    vec![
        ("throughput_1", System::ALL.to_vec()),
        ("throughput_8", System::ALL.to_vec()),
        ("pingpong", System::ALL.to_vec()),
        ("connrate", System::ALL.to_vec()),
        ("idle", proxies),
    ]
}

pub fn bench(lb_bin: &Path, bench_bin: &Path, hold_bin: &Path, o: &Opts) -> anyhow::Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("LB_BIN", lb_bin) };
    let rounds = o.runs + usize::from(!o.smoke);
    let plan: Vec<_> =
        scenarios().into_iter().filter(|(n, _)| o.only.is_empty() || o.only.iter().any(|x| x == n)).collect();
    if plan.is_empty() {
        bail!("--only {:?}: no such scenario (throughput_1, throughput_8, pingpong, connrate, idle)", o.only);
    }
    let total: usize = plan.iter().map(|(_, s)| s.len() * rounds).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (_sink, v) = Helper::start(bench_bin, &["sink", "--listen", "127.0.0.1:0"])?;
    let sink: SocketAddr = v["listen"].as_str().context("sink address")?.parse()?;
    // results[scenario][system] = one Sample per counted round.
    let mut results: BTreeMap<String, BTreeMap<System, Vec<Sample>>> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    for (scenario, systems) in &plan {
        let idle_n = |sys: System| match sys {
            System::LbKernel | System::LbUserspace => o.conns,
            _ => o.conns.min(SINGLE_PROCESS_CAP),
        };
        // Idle connections need the echoing lb-hold sink (it answers the
        // holders' byte), as several processes sharing one port so that
        // none passes the open-files limit.
        let (_hold_sinks, hold_addr) = if *scenario == "idle" {
            let (h, a) = sinks(hold_bin, o.conns)?;
            (h, Some(a))
        } else {
            (Vec::new(), None)
        };
        for round in 0..rounds {
            let counted = o.smoke || round > 0;
            for &sys in systems {
                let msg = format!("{scenario} {} round {}/{}", sys.name(), round + 1, rounds);
                if !tty {
                    // indicatif draws nothing without a terminal (CI logs): one line per step.
                    eprintln!("[{:>3}/{total}] {msg}", bar.position() + 1);
                }
                bar.set_message(msg);
                let backend = hold_addr.unwrap_or(sink);
                let measured = start(sys, backend, (*scenario == "idle").then(|| idle_n(sys))).and_then(|proxy| {
                    let pids = proxy.pids();
                    match *scenario {
                        "throughput_1" => measure_throughput(bench_bin, proxy.addr, &pids, 1, o.secs),
                        "throughput_8" => measure_throughput(bench_bin, proxy.addr, &pids, 8, o.secs),
                        "pingpong" => measure_pingpong(bench_bin, proxy.addr, o.secs),
                        "connrate" => measure_connrate(bench_bin, proxy.addr, &pids, o.secs),
                        _ => measure_idle(hold_bin, &proxy, idle_n(sys)),
                    }
                });
                match measured {
                    Ok(sample) if counted => {
                        results.entry(scenario.to_string()).or_default().entry(sys).or_default().push(sample)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Keep going: one failure must not throw away the rest of the run.
                        let e = format!("{scenario} on {} (round {}): {e:#}", sys.name(), round + 1);
                        bar.println(format!("FAILED {e}"));
                        errors.push(e);
                    }
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_with_message("done");
    report(&results, o)?;
    if !errors.is_empty() {
        bail!("{} measurement(s) failed:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Median, min, max of `metric` for `sys`; and the median of per-round
/// ratios to `reference` (same round index = run pair).
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(samples: &[Sample], metric: &str) -> Option<Stat> {
    let mut v: Vec<f64> = samples.iter().filter_map(|s| s.get(metric).copied()).collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stat { median: median(&mut v), min, max })
}

fn ratio(a: &[Sample], b: &[Sample], metric: &str) -> Option<f64> {
    let mut r: Vec<f64> =
        a.iter().zip(b).filter_map(|(x, y)| Some(x.get(metric)? / y.get(metric)?)).filter(|r| r.is_finite()).collect();
    (!r.is_empty()).then(|| median(&mut r))
}

/// (scenario, metric, unit, higher is better)
const METRICS: &[(&str, &str, &str, bool)] = &[
    ("throughput_1", "gbit_per_s", "Gbit/s, 1 stream", true),
    ("throughput_8", "gbit_per_s", "Gbit/s, 8 streams", true),
    ("throughput_1", "cpu_s_per_gib", "proxy CPU s per GiB, 1 stream", false),
    ("throughput_8", "cpu_s_per_gib", "proxy CPU s per GiB, 8 streams", false),
    ("pingpong", "avg_us", "ping-pong 64 B avg µs", false),
    ("pingpong", "p50_us", "ping-pong p50 µs", false),
    ("pingpong", "p99_us", "ping-pong p99 µs", false),
    ("pingpong", "p999_us", "ping-pong p99.9 µs", false),
    ("connrate", "conns_per_s", "new connections per s", true),
    ("connrate", "cpu_us_per_conn", "proxy CPU µs per connection", false),
    ("idle", "held", "idle connections held", true),
    ("idle", "setup_s", "idle: setup s", false),
    ("idle", "rss_bytes_per_conn", "idle: proxy RSS bytes per conn", false),
    ("idle", "kernel_bytes_per_conn", "idle: kernel slab bytes per conn (all 4 sockets)", false),
];

fn report(results: &BTreeMap<String, BTreeMap<System, Vec<Sample>>>, o: &Opts) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.out)?;
    let machine = machine();
    let command = if o.smoke {
        "cargo xtask bench --smoke".to_owned()
    } else {
        format!("cargo xtask bench --runs {} --secs {} --conns {}", o.runs, o.secs, o.conns)
    };
    let mut md = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(md, "Command: `{command}`  \nMachine: {}  \n", machine["summary"].as_str().unwrap_or(""));
    let _ = writeln!(
        md,
        "{} counted runs per system{}, systems alternating within each round. \
         Median [min–max]; ratios are medians of per-round ratios.\n",
        o.runs,
        if o.smoke { " (smoke: too short to mean anything)" } else { " after one warm-up round" }
    );
    let _ = writeln!(md, "| metric | system | median | min | max | ÷ direct | ÷ HAProxy |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for (scenario, metric, label, higher) in METRICS {
        let Some(by_sys) = results.get(*scenario) else { continue };
        // The better HAProxy variant (splice or not) by median is the reference.
        let hap = [System::Haproxy, System::HaproxySplice]
            .into_iter()
            .filter_map(|s| Some((s, stat(by_sys.get(&s)?, metric)?.median)))
            .max_by(|a, b| if *higher { a.1.total_cmp(&b.1) } else { b.1.total_cmp(&a.1) })
            .map(|(s, _)| s);
        for (sys, samples) in by_sys {
            let Some(st) = stat(samples, metric) else { continue };
            let to_direct = by_sys.get(&System::Direct).and_then(|d| ratio(samples, d, metric));
            let to_hap = hap.and_then(|h| ratio(samples, by_sys.get(&h)?, metric));
            let f = |x: Option<f64>| x.map_or("–".to_owned(), |r| format!("{r:.2}"));
            let cap = if *scenario == "idle" && matches!(sys, System::Haproxy | System::HaproxySplice | System::Nginx) {
                " (single process: capped)"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {label} | {}{cap} | {} | {} | {} | {} | {} |",
                sys.name(),
                num(st.median),
                num(st.min),
                num(st.max),
                f(to_direct),
                f(to_hap)
            );
            json_rows.push(json!({
                "scenario": scenario, "metric": metric, "label": label, "system": sys.name(),
                "median": st.median, "min": st.min, "max": st.max,
                "ratio_to_direct": to_direct, "ratio_to_haproxy": to_hap,
                "haproxy_reference": hap.map(System::name),
                "values": samples.iter().filter_map(|s| s.get(*metric)).collect::<Vec<_>>(),
            }));
        }
    }
    let stamp = timestamp();
    let json = json!({ "command": command, "machine": machine, "runs": o.runs, "secs": o.secs, "idle_conns": o.conns, "results": json_rows });
    let prefix = if o.smoke { "smoke" } else { "bench" };
    std::fs::write(o.out.join(format!("{prefix}-{stamp}.json")), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(o.out.join(format!("{prefix}-{stamp}.md")), &md)?;
    std::fs::write(o.out.join(format!("{prefix}-latest.md")), &md)?;
    std::fs::write(o.out.join(format!("{prefix}-latest.json")), serde_json::to_string_pretty(&json)?)?;
    for (scenario, metric, label, _) in METRICS {
        if let Some(by_sys) = results.get(*scenario) {
            let path = o.out.join(format!("{prefix}-{scenario}-{metric}.png"));
            if let Err(e) = crate::plot::bars(&path, label, by_sys, metric) {
                eprintln!("plot {}: {e:#}", path.display());
            }
        }
    }
    println!("{md}");
    println!("results in {}/{prefix}-{stamp}.{{json,md}} and {prefix}-*.png", o.out.display());
    Ok(())
}

/// A figure for the tables: 3 significant digits or so, 4 decimals below 1.
fn num(x: f64) -> String {
    crate::format_figure(x, 4)
}

fn timestamp() -> String {
    let out = Command::new("date").arg("-u").arg("+%Y%m%dT%H%M%SZ").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_else(|_| "now".into())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1048576.0);
    let ver = |c: &str, a: &str| {
        Command::new(c).arg(a).output().map(|o| {
            let s = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&s).lines().next().unwrap_or("").trim().to_owned()
        })
    };
    let haproxy = ver("haproxy", "-v").unwrap_or_default();
    let nginx = ver("nginx", "-v").unwrap_or_default();
    json!({
        "cpu": cpu, "cores": cores, "kernel": kernel, "mem_gib": mem_gib, "haproxy": haproxy, "nginx": nginx,
        "summary": format!("{cores} × {cpu}, {mem_gib:.0} GiB, Linux {kernel}; {haproxy}; {nginx}"),
    })
}
