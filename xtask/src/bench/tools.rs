//! Measurements with the field's standard tools (iperf3, sockperf, wrk),
//! the backends they talk to, and what the whole machine spent meanwhile.
//! lb's own `lb-hold` is used only for the idle hold, where no standard
//! tool holds tens of thousands of idle connections.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testkit::external::{self, Process};

use super::{Opts, Scenario, stats::Sample, systems::Running};
use crate::hold::{Helper, hold_clients, sinks};

/// What the clients of a scenario talk to, through the system under test.
pub enum Backend {
    Server(Process),
    /// `lb-hold sink` processes sharing one port (stopped when dropped).
    Sinks(#[allow(dead_code)] Vec<Helper>, SocketAddr),
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Server(p) => p.addr,
            Self::Sinks(_, a) => *a,
        }
    }
}

/// Starts the backend of `scenario`.
pub fn backend(scenario: Scenario, hold_bin: &Path, o: &Opts) -> anyhow::Result<Backend> {
    let server = match scenario {
        Scenario::Throughput1 | Scenario::Throughput4 => external::server("iperf3", |addr, _| {
            Ok(vec!["-s".into(), "-B".into(), addr.ip().to_string(), "-p".into(), addr.port().to_string()])
        }),
        Scenario::Pingpong => external::server("sockperf", |addr, _| {
            Ok(["server", "--tcp", "-i", &addr.ip().to_string(), "-p", &addr.port().to_string()]
                .map(String::from)
                .to_vec())
        }),
        Scenario::Connrate => external::nginx_http("ok\n"),
        Scenario::Idle => {
            let (helpers, addr) = sinks(hold_bin, o.conns)?;
            return Ok(Backend::Sinks(helpers, addr));
        }
    };
    let p = server.map_err(anyhow::Error::msg).with_context(|| format!("{} backend", scenario.name()))?;
    Ok(Backend::Server(p))
}

/// CPU time the whole machine spent (everything but idle and iowait) since
/// boot, in seconds. The kernel's splice runs in softirq and kworker
/// context, charged to no process: only this counts it.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    busy / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of processes, in seconds.
pub fn process_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|p| testkit::cpu_time(*p).as_secs_f64()).sum()
}

/// What a client run cost: machine-wide and the proxy's own CPU seconds.
struct Cost {
    machine0: f64,
    proxy0: f64,
    pids: Vec<u32>,
}

impl Cost {
    fn start(pids: &[u32]) -> Self {
        Cost { machine0: machine_busy_secs(), proxy0: process_secs(pids), pids: pids.to_vec() }
    }
    /// (machine, proxy) CPU seconds since `start`.
    fn end(&self) -> (f64, f64) {
        (machine_busy_secs() - self.machine0, process_secs(&self.pids) - self.proxy0)
    }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown} (run `cargo xtask setup`)"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{shown} failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// Whole seconds for tools that take no fractions (at least 1).
fn whole_secs(secs: f64) -> String {
    (secs.round() as u64).max(1).to_string()
}

/// iperf3 with `streams` parallel streams through `target`: Gbit/s at the
/// receiver, and machine and proxy CPU seconds per GiB moved.
pub fn throughput(target: SocketAddr, pids: &[u32], streams: usize, o: &Opts) -> anyhow::Result<Sample> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", &target.ip().to_string(), "-p", &target.port().to_string(), "-J", "-P", &streams.to_string()]);
    if o.smoke {
        cmd.args(["-n", "64M"]);
    } else {
        cmd.args(["-t", &whole_secs(o.secs)]);
    }
    let cost = Cost::start(pids);
    let text = output(&mut cmd)?;
    let (machine, proxy) = cost.end();
    let v: serde_json::Value = serde_json::from_str(&text).context("iperf3 -J printed no JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 through {target}: {e}");
    }
    let received = &v["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().context("iperf3: end.sum_received.bytes")?;
    let bits = received["bits_per_second"].as_f64().context("iperf3: end.sum_received.bits_per_second")?;
    let gib = bytes / (1u64 << 30) as f64;
    let mut s = Sample::new();
    s.insert("gbit_per_s".into(), bits / 1e9);
    s.insert("machine_cpu_s_per_gib".into(), machine / gib);
    if !pids.is_empty() {
        s.insert("proxy_cpu_s_per_gib".into(), proxy / gib);
    }
    Ok(s)
}

/// sockperf TCP ping-pong of 64-byte messages through `target`: round-trip
/// times in µs (average and percentiles).
pub fn pingpong(target: SocketAddr, o: &Opts) -> anyhow::Result<Sample> {
    let text = output(Command::new("sockperf").args([
        "ping-pong",
        "--tcp",
        "-i",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-m",
        "64",
        "-t",
        &whole_secs(o.secs),
        "--full-rtt",
    ]))?;
    let find = |key: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            rest.trim_start_matches([' ', '=']).split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
        })
    };
    let mut s = Sample::new();
    for (metric, key) in [
        ("avg_us", "avg-rtt="),
        ("p50_us", "percentile 50.000"),
        ("p99_us", "percentile 99.000"),
        ("p999_us", "percentile 99.900"),
    ] {
        let v = find(key).with_context(|| format!("sockperf printed no {key:?}: {text}"))?;
        s.insert(metric.into(), v);
    }
    Ok(s)
}

/// wrk with `Connection: close` (one new connection per request, as an
/// HTTP/1.0 client) against nginx through `target`: connections per second,
/// and machine and proxy CPU µs per connection.
pub fn connrate(target: SocketAddr, pids: &[u32], o: &Opts) -> anyhow::Result<Sample> {
    let cost = Cost::start(pids);
    let text = output(Command::new("wrk").args([
        "-t2",
        "-c64",
        &format!("-d{}s", whole_secs(o.secs)),
        "-H",
        "Connection: close",
        &format!("http://{target}/"),
    ]))?;
    let (machine, proxy) = cost.end();
    let num = |key: &str| -> Option<f64> {
        text.lines().find_map(|l| l.trim().strip_prefix(key)?.split_whitespace().next()?.parse().ok())
    };
    let rate = num("Requests/sec:").with_context(|| format!("wrk printed no rate: {text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse::<f64>().ok())
        .with_context(|| format!("wrk printed no request count: {text}"))?;
    if let Some(l) = text.lines().find(|l| l.contains("Socket errors") || l.contains("Non-2xx")) {
        bail!("wrk through {target}: {}", l.trim());
    }
    let mut s = Sample::new();
    s.insert("conns_per_s".into(), rate);
    s.insert("machine_cpu_us_per_conn".into(), machine * 1e6 / requests);
    if !pids.is_empty() {
        s.insert("proxy_cpu_us_per_conn".into(), proxy * 1e6 / requests);
        let (calls, bpf) = super::syscalls::per_conn(target, pids, if o.smoke { 200 } else { 2000 })?;
        s.insert("syscalls_per_conn".into(), calls);
        s.insert("bpf_per_conn".into(), bpf);
    }
    Ok(s)
}

/// Kernel slab in use, KiB: objects in use × their size over every cache
/// of `/proc/slabinfo` but `proc_inode_cache`. On this machine a process
/// outside lb (the sandbox's agent) looks up `/proc/<pid>/fd` entries of
/// socket descriptors every few seconds, which makes a /proc inode per
/// socket held by any process (Python holding 10,000 sockets: +9,936 in
/// `proc_inode_cache`, gone at close; 10,000 `/dev/null` descriptors: none).
/// Whether a system's sockets were visited before the sample is luck, so
/// that cache is left out for every system.
fn slab_kb() -> f64 {
    let all = crate::hold::slabs();
    let bytes: u64 = all.iter().filter(|(name, _)| name.as_str() != "proc_inode_cache").map(|(_, b)| b).sum();
    bytes as f64 / 1024.0
}

/// `n` idle connections through `running` from `lb-hold` processes: the
/// machine's slab growth and the proxy's RSS growth, per connection.
pub fn idle(hold_bin: &Path, running: &Running, n: usize) -> anyhow::Result<Sample> {
    let rss = |pids: &[u32]| pids.iter().map(|p| testkit::status_kb(*p, "VmRSS") as f64).sum::<f64>();
    let (rss0, slab0) = (rss(&running.pids()), slab_kb());
    let joins0 = super::systems::joins(running);
    let t0 = Instant::now();
    let held = hold_clients(hold_bin, running.addr(), n)?;
    let setup = t0.elapsed().as_secs_f64();
    // On the packet plane each connection is joined after its splice: the
    // memory is of joined connections once every join is done.
    if let Some(start) = joins0 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while super::systems::joins(running).is_some_and(|(j, k)| (j + k).saturating_sub(start.0 + start.1) < n as u64)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Let the proxies settle their per-connection state.
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, slab1) = (rss(&running.pids()), slab_kb());
    let ok = held.ok;
    drop(held);
    if ok as usize != n {
        bail!("only {ok} of {n} idle connections got through {}", running.addr());
    }
    let per_conn = |kb: f64| kb.max(0.0) * 1024.0 / n as f64;
    let mut s = Sample::new();
    s.insert("held".into(), ok as f64);
    s.insert("setup_s".into(), setup);
    s.insert("slab_bytes_per_conn".into(), per_conn(slab1 - slab0));
    s.insert("rss_bytes_per_conn".into(), per_conn(rss1 - rss0));
    s.insert("total_bytes_per_conn".into(), per_conn(slab1 - slab0 + rss1 - rss0));
    Ok(s)
}
