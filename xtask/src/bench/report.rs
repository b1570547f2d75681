//! What a benchmark run wrote: JSON with every value, a markdown table of
//! medians and ratios, the goals measured against, and bar charts.

use std::{fmt::Write as _, process::Command};

use serde_json::{Value, json};

use super::{
    Opts, Results, Scenario, System,
    stats::{Stat, ratio, stat},
};

/// (scenario, metric, label, higher is better)
const METRICS: &[(Scenario, &str, &str, bool)] = &[
    (Scenario::Throughput1, "gbit_per_s", "iperf3 1 stream, Gbit/s", true),
    (Scenario::Throughput4, "gbit_per_s", "iperf3 4 streams, Gbit/s", true),
    (Scenario::Throughput1, "machine_cpu_s_per_gib", "machine CPU s per GiB, 1 stream", false),
    (Scenario::Throughput4, "machine_cpu_s_per_gib", "machine CPU s per GiB, 4 streams", false),
    (Scenario::Throughput1, "proxy_cpu_s_per_gib", "proxy process CPU s per GiB, 1 stream", false),
    (Scenario::Throughput4, "proxy_cpu_s_per_gib", "proxy process CPU s per GiB, 4 streams", false),
    (Scenario::Pingpong, "avg_us", "sockperf ping-pong 64 B, avg RTT µs", false),
    (Scenario::Pingpong, "p50_us", "sockperf ping-pong, p50 RTT µs", false),
    (Scenario::Pingpong, "p99_us", "sockperf ping-pong, p99 RTT µs", false),
    (Scenario::Pingpong, "p999_us", "sockperf ping-pong, p99.9 RTT µs", false),
    (Scenario::Connrate, "conns_per_s", "wrk new connections per s", true),
    (Scenario::Connrate, "machine_cpu_us_per_conn", "machine CPU µs per connection", false),
    (Scenario::Connrate, "proxy_cpu_us_per_conn", "proxy process CPU µs per connection", false),
    (Scenario::Connrate, "syscalls_per_conn", "proxy syscalls per connection (strace -f -c, ab)", false),
    (Scenario::Connrate, "bpf_per_conn", "proxy bpf() calls per connection", false),
    (Scenario::Idle, "held", "idle connections held", true),
    (Scenario::Throughput1, "joined_pct", "lb-packet: % of connections joined, 1 stream", true),
    (Scenario::Throughput4, "joined_pct", "lb-packet: % of connections joined, 4 streams", true),
    (Scenario::Pingpong, "joined_pct", "lb-packet: % of connections joined, ping-pong", true),
    (Scenario::Connrate, "joined_pct", "lb-packet: % of connections joined, new connections", true),
    (Scenario::Idle, "joined_pct", "lb-packet: % of connections joined, idle", true),
    (Scenario::Idle, "setup_s", "idle: setup s", false),
    (Scenario::Idle, "slab_bytes_per_conn", "idle: machine slab bytes per conn", false),
    (Scenario::Idle, "rss_bytes_per_conn", "idle: proxy RSS bytes per conn", false),
    (Scenario::Idle, "total_bytes_per_conn", "idle: slab + RSS bytes per conn", false),
    (Scenario::Idle, "map_bytes_per_conn", "idle: map entries per conn (lb-packet, computed)", false),
    (Scenario::Idle, "own_bytes_per_conn", "idle: the proxy's own bytes per conn", false),
];

/// Figures computed from the others: a proxy's own memory per idle
/// connection is the slab it grew beyond a direct connection's (the
/// client's and backend's sockets) plus its RSS growth, round by round.
pub fn derive(results: &mut Results) {
    let Some(idle) = results.get_mut(&Scenario::Idle) else { return };
    let direct: Vec<Option<f64>> = idle
        .get(&System::Direct)
        .map(|d| d.iter().map(|s| s.get("slab_bytes_per_conn").copied()).collect())
        .unwrap_or_default();
    for (sys, samples) in idle.iter_mut() {
        if *sys == System::Direct {
            continue;
        }
        for (i, s) in samples.iter_mut().enumerate() {
            if let (Some(Some(d)), Some(slab), Some(rss)) =
                (direct.get(i), s.get("slab_bytes_per_conn").copied(), s.get("rss_bytes_per_conn").copied())
            {
                let maps = s.get("map_bytes_per_conn").copied().unwrap_or(0.0);
                s.insert("own_bytes_per_conn".into(), slab - d + rss + maps);
            }
        }
    }
}

/// The better HAProxy variant (splice or not) by median: the reference.
fn haproxy(results: &Results, scenario: Scenario, metric: &str, higher: bool) -> Option<System> {
    let by_sys = results.get(&scenario)?;
    [System::Haproxy, System::HaproxySplice]
        .into_iter()
        .filter_map(|s| Some((s, stat(by_sys.get(&s)?, metric)?.median)))
        .max_by(|a, b| if higher { a.1.total_cmp(&b.1) } else { b.1.total_cmp(&a.1) })
        .map(|(s, _)| s)
}

/// `lb`'s median ratio to `to` (HAProxy's better variant or direct).
fn lb_ratio(results: &Results, lb: System, scenario: Scenario, metric: &str, to: Option<System>) -> Option<f64> {
    let by_sys = results.get(&scenario)?;
    ratio(by_sys.get(&lb)?, by_sys.get(&to?)?, metric)
}

/// A goal: what, the measured figure, its unit, met.
type Goal = (String, Option<f64>, &'static str, bool);

/// The packet plane's goals, against this run's figures.
fn packet_goals(results: &Results) -> Vec<Goal> {
    let sys = System::LbPacket;
    let hap = |sc, m, higher| lb_ratio(results, sys, sc, m, haproxy(results, sc, m, higher));
    let direct = |sc, m| lb_ratio(results, sys, sc, m, Some(System::Direct));
    let lb = |sc, m| stat(results.get(&sc)?.get(&sys)?, m).map(|s| s.median);
    let mut v: Vec<Goal> = Vec::new();
    let mut goal = |what: &str, r: Option<f64>, unit: &'static str, met: fn(f64) -> bool| {
        v.push((what.to_owned(), r, unit, r.is_some_and(met)))
    };
    goal("one stream ≥ 0.9 × direct", direct(Scenario::Throughput1, "gbit_per_s"), " ×", |r| r >= 0.9);
    goal("one stream ≥ 1.5 × HAProxy", hap(Scenario::Throughput1, "gbit_per_s", true), " ×", |r| r >= 1.5);
    goal("four streams ≥ 0.9 × direct", direct(Scenario::Throughput4, "gbit_per_s"), " ×", |r| r >= 0.9);
    for (sc, n) in [(Scenario::Throughput1, "one"), (Scenario::Throughput4, "four")] {
        let m = "machine_cpu_s_per_gib";
        goal(&format!("machine CPU per GiB, {n} stream(s) ≤ 1.2 × direct"), direct(sc, m), " ×", |r| r <= 1.2);
        goal(&format!("machine CPU per GiB, {n} stream(s) ≤ 0.6 × HAProxy"), hap(sc, m, false), " ×", |r| r <= 0.6);
    }
    for (m, n) in [("avg_us", "avg"), ("p99_us", "p99")] {
        goal(&format!("ping-pong {n} ≤ 1.15 × direct"), direct(Scenario::Pingpong, m), " ×", |r| r <= 1.15);
        goal(&format!("ping-pong {n} ≤ 0.75 × HAProxy"), hap(Scenario::Pingpong, m, false), " ×", |r| r <= 0.75);
    }
    goal("new connections per s ≥ 1.2 × HAProxy", hap(Scenario::Connrate, "conns_per_s", true), " ×", |r| r >= 1.2);
    goal("syscalls per connection ≤ 15", lb(Scenario::Connrate, "syscalls_per_conn"), "", |n| n <= 15.0);
    goal("idle connection, own memory ≤ 1,000 B", lb(Scenario::Idle, "own_bytes_per_conn"), " B", |n| n <= 1000.0);
    goal(
        "idle connection, own memory ≤ 0.1 × HAProxy's",
        hap(Scenario::Idle, "own_bytes_per_conn", false),
        " ×",
        |r| r <= 0.1,
    );
    v
}

/// The goals of the project's issues, against this run's ratios.
fn goals(results: &Results) -> Vec<Goal> {
    let hap = |sc, m, higher| lb_ratio(results, System::LbKernel, sc, m, haproxy(results, sc, m, higher));
    let direct = |sc, m| lb_ratio(results, System::LbKernel, sc, m, Some(System::Direct));
    let at_least = |r: Option<f64>, g: f64| r.is_some_and(|r| r >= g);
    let at_most = |r: Option<f64>, g: f64| r.is_some_and(|r| r <= g);
    let lb = |sc, m| stat(results.get(&sc)?.get(&System::LbKernel)?, m).map(|s| s.median);
    let mut v = Vec::new();
    let mut count = |what: &str, n: Option<f64>, met: bool| v.push((what.to_owned(), n, "", met));
    let n = lb(Scenario::Connrate, "syscalls_per_conn");
    count("syscalls per connection ≤ 15", n, at_most(n, 15.0));
    let n = lb(Scenario::Connrate, "bpf_per_conn");
    count("bpf() calls per connection ≤ 2", n, at_most(n, 2.0));
    let mut goal = |what: &str, r: Option<f64>, met: bool| v.push((what.to_owned(), r, " ×", met));
    let r = hap(Scenario::Connrate, "conns_per_s", true);
    goal("new connections per s ≥ 1.2 × HAProxy", r, at_least(r, 1.2));
    let r = hap(Scenario::Throughput1, "gbit_per_s", true);
    goal("one stream ≥ 1.5 × HAProxy", r, at_least(r, 1.5));
    let r = hap(Scenario::Throughput4, "gbit_per_s", true);
    goal("four streams ≥ 1.7 × HAProxy", r, at_least(r, 1.7));
    let r = direct(Scenario::Throughput4, "gbit_per_s");
    goal("four streams ≥ 0.8 × direct", r, at_least(r, 0.8));
    let r = hap(Scenario::Throughput4, "machine_cpu_s_per_gib", false);
    goal("machine CPU per GiB at four streams ≤ 0.4 × HAProxy's", r, at_most(r, 0.4));
    let r = hap(Scenario::Pingpong, "avg_us", false);
    goal("ping-pong avg ≤ 0.75 × HAProxy's", r, at_most(r, 0.75));
    let r = hap(Scenario::Pingpong, "p99_us", false);
    goal("ping-pong p99 ≤ 0.75 × HAProxy's", r, at_most(r, 0.75));
    let r = hap(Scenario::Idle, "own_bytes_per_conn", false);
    goal("idle connection, the proxy's own memory ≤ 0.8 × HAProxy's", r, at_most(r, 0.8));
    v
}

/// A figure for the tables: 3 significant digits or so, 4 decimals below 1.
fn num(x: f64) -> String {
    crate::format_figure(x, 4)
}

pub fn write(results: &Results, guard: Option<&super::guard::Figures>, o: &Opts) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.out)?;
    let machine = machine();
    let only = if o.only.is_empty() { String::new() } else { format!(" --only {}", o.only.join(",")) };
    let command = if o.smoke {
        format!("cargo xtask bench --smoke{only}")
    } else {
        format!("cargo xtask bench --runs {} --secs {} --conns {}{only}", o.runs, o.secs, o.conns)
    };
    let mut md = String::new();
    let _ = writeln!(md, "Command: `{command}`  \nMachine: {}  \n", machine["summary"].as_str().unwrap_or(""));
    let _ = writeln!(
        md,
        "{} counted round(s){}, systems alternating within each round. Tools: iperf3 (throughput), \
         sockperf ping-pong --full-rtt (latency), wrk -t2 -c64 with `Connection: close` against nginx \
         (connection rate), lb-hold (idle connections). Machine CPU is all CPUs' busy time from \
         /proc/stat while the tool ran. Median [min–max]; ratios are medians of per-round ratios; \
         HAProxy's ratio uses its better variant (with or without splice-auto) for each metric.\n",
        o.runs,
        if o.smoke { " (smoke: too short to mean anything)" } else { " after one warm-up round" }
    );
    let _ = writeln!(md, "| metric | system | median | min | max | ÷ direct | ÷ HAProxy |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for &(scenario, metric, label, higher) in METRICS {
        let Some(by_sys) = results.get(&scenario) else { continue };
        let hap = haproxy(results, scenario, metric, higher);
        for (sys, samples) in by_sys {
            let Some(Stat { median, min, max }) = stat(samples, metric) else { continue };
            let to_direct = by_sys.get(&System::Direct).and_then(|d| ratio(samples, d, metric));
            let to_hap = hap.and_then(|h| ratio(samples, by_sys.get(&h)?, metric));
            let f = |x: Option<f64>| x.map_or("–".to_owned(), |r| format!("{r:.2}"));
            let cap = if scenario == Scenario::Idle && !(sys.is_lb() || *sys == System::Direct) {
                " (one process: capped)"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {label} | {}{cap} | {} | {} | {} | {} | {} |",
                sys.name(),
                num(median),
                num(min),
                num(max),
                f(to_direct),
                f(to_hap)
            );
            json_rows.push(json!({
                "scenario": scenario.name(), "metric": metric, "label": label, "system": sys.name(),
                "median": median, "min": min, "max": max,
                "ratio_to_direct": to_direct, "ratio_to_haproxy": to_hap,
                "haproxy_reference": hap.map(System::name),
                "values": super::stats::values(samples, metric),
            }));
        }
    }
    let goals = goals(results);
    let packet_goals = packet_goals(results);
    for (sys, goals) in [("lb-kernel", &goals), ("lb-packet", &packet_goals)] {
        let _ = writeln!(md, "\nGoals ({sys}, medians of per-round ratios):\n");
        let _ = writeln!(md, "| goal | measured | |");
        let _ = writeln!(md, "|---|---:|---|");
        for (what, r, unit, met) in goals {
            let (m, verdict) = match r {
                Some(r) => (format!("{r:.2}{unit}"), if *met { "met" } else { "not met" }),
                None => ("–".to_owned(), "not measured in this run"),
            };
            let _ = writeln!(md, "| {what} | {m} | {verdict} |");
        }
    }
    let mut guard_json = Value::Null;
    let med = |v: &[f64]| super::stats::median(v);
    let row = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        format!("{} | {} | {}", num(med(v)), num(lo), num(hi))
    };
    match guard {
        Some(super::guard::Figures::Rates { dropped, reached }) => {
            let (d, r) = (med(dropped), med(reached));
            let _ = writeln!(
                md,
                "\nXDP guard, one core, the kernel generating the frames (BPF_PROG_TEST_RUN live frames): SYNs \
                 per second dropped from a denied source against the same SYNs passed to the listener's TCP stack.\n"
            );
            let _ = writeln!(md, "| | median | min | max |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            let _ = writeln!(md, "| dropped by the guard, SYN/s | {} |", row(dropped));
            let _ = writeln!(md, "| reaching the listener without it, SYN/s | {} |", row(reached));
            let _ = writeln!(md, "| ratio | {:.2} × | | |", d / r);
            guard_json = json!({"dropped_pps": dropped, "reached_pps": reached, "ratio": d / r});
        }
        Some(super::guard::Figures::NoLiveFrames { why, ns_per_frame }) => {
            let _ = writeln!(
                md,
                "\nXDP guard: not measured on this host ({why}). Without live frames the kernel cannot \
                 generate the flood, and no userspace generator is as fast as the guard. The guard still \
                 dropped every denied frame of ordinary test runs (its counter checked); the program's own \
                 time per frame, as the kernel measured it (no driver, no frame allocation):\n"
            );
            let _ = writeln!(md, "| | median | min | max |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            let _ = writeln!(md, "| guard program per denied frame, ns | {} |", row(ns_per_frame));
            guard_json = json!({"not_measured": why, "program_ns_per_frame": ns_per_frame});
        }
        None => {}
    }
    let stamp = timestamp();
    let goals_json = |goals: &[Goal]| -> Vec<Value> {
        goals
            .iter()
            .map(|(g, r, unit, met)| json!({"goal": g, "measured": r, "unit": unit.trim(), "met": met}))
            .collect()
    };
    let (goals_json, packet_goals_json) = (goals_json(&goals), goals_json(&packet_goals));
    let json = json!({
        "command": command, "machine": machine, "runs": o.runs, "secs": o.secs, "idle_conns": o.conns,
        "results": json_rows, "goals": goals_json, "packet_goals": packet_goals_json, "guard": guard_json,
    });
    let prefix = if o.smoke { "smoke" } else { "bench" };
    std::fs::write(o.out.join(format!("{prefix}-{stamp}.json")), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(o.out.join(format!("{prefix}-{stamp}.md")), &md)?;
    // A partial run (--only) does not replace the latest full one.
    if o.only.is_empty() {
        std::fs::write(o.out.join(format!("{prefix}-latest.md")), &md)?;
        std::fs::write(o.out.join(format!("{prefix}-latest.json")), serde_json::to_string_pretty(&json)?)?;
    }
    for &(scenario, metric, label, _) in METRICS {
        if let Some(by_sys) = results.get(&scenario) {
            let path = o.out.join(format!("{prefix}-{}-{metric}.png", scenario.name()));
            if let Err(e) = super::plot::bars(&path, label, by_sys, metric) {
                eprintln!("plot {}: {e:#}", path.display());
            }
        }
    }
    println!("{md}");
    println!("results in {}/{prefix}-{stamp}.{{json,md}} and {prefix}-*.png", o.out.display());
    Ok(())
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
    let ver = |c: &str, a: &str| {
        Command::new(c)
            .arg(a)
            .output()
            .map(|o| {
                let s = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                String::from_utf8_lossy(&s).lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    };
    let kernel = ver("uname", "-r");
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1048576.0);
    let (haproxy, nginx) = (ver("haproxy", "-v"), ver("nginx", "-v"));
    let tools =
        [("iperf3", "--version"), ("sockperf", "--version"), ("wrk", "--version")].map(|(t, a)| ver(t, a)).join("; ");
    json!({
        "cpu": cpu, "cores": cores, "kernel": kernel, "mem_gib": mem_gib, "haproxy": haproxy, "nginx": nginx,
        "tools": tools,
        "summary": format!("{cores} × {cpu}, {mem_gib:.0} GiB, Linux {kernel}; {haproxy}; {nginx}"),
    })
}
