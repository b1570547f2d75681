//! `cargo xtask bench`: lb against a direct connection, HAProxy and nginx,
//! measured side by side in one run with the field's standard tools
//! (iperf3, sockperf, wrk). Systems alternate within every round
//! (A B C … A B C …); the first round is a warm-up and is not counted.
//!
//! - `systems`: what runs (direct, lb on each plane, HAProxy, nginx);
//! - `tools`: the backends and the measurements, machine CPU from /proc/stat;
//! - `stats`: medians and per-round ratios;
//! - `report`: JSON, the markdown table, the goals, the plots;
//! - `guard`: the XDP guard's drop rate against what reaches the listener.

mod guard;
mod plot;
mod report;
mod stats;
mod syscalls;
mod systems;
mod tools;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::bail;
pub use systems::System;

use self::{stats::Sample, systems::SINGLE_PROCESS_CAP};

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
            secs: 1.0,
            conns: 300,
            out: crate::workspace_root().join("target/bench-smoke"),
        }
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// iperf3, one stream.
    Throughput1,
    /// iperf3, four parallel streams.
    Throughput4,
    /// sockperf TCP ping-pong, 64-byte messages.
    Pingpong,
    /// wrk, a new connection per request, against nginx.
    Connrate,
    /// Idle connections held by `lb-hold`: memory per connection.
    Idle,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [Self::Throughput1, Self::Throughput4, Self::Pingpong, Self::Connrate, Self::Idle];

    pub fn name(self) -> &'static str {
        match self {
            Self::Throughput1 => "throughput_1",
            Self::Throughput4 => "throughput_4",
            Self::Pingpong => "pingpong",
            Self::Connrate => "connrate",
            Self::Idle => "idle",
        }
    }
}

/// Every sample: scenario -> system -> one per counted round.
pub type Results = BTreeMap<Scenario, BTreeMap<System, Vec<Sample>>>;

pub fn bench(lb_bin: &std::path::Path, hold_bin: &std::path::Path, o: &Opts) -> anyhow::Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("LB_BIN", lb_bin) };
    let rounds = o.runs + usize::from(!o.smoke);
    let plan: Vec<Scenario> =
        Scenario::ALL.into_iter().filter(|s| o.only.is_empty() || o.only.iter().any(|x| x == s.name())).collect();
    let run_guard = o.only.is_empty() || o.only.iter().any(|x| x == "guard");
    if plan.is_empty() && !run_guard {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).chain(["guard"]).collect();
        bail!("--only {:?}: no such scenario ({})", o.only, names.join(", "));
    }
    let total = plan.len() * System::ALL.len() * rounds;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut results = Results::new();
    let mut errors: Vec<String> = Vec::new();
    for &scenario in &plan {
        let backend = tools::backend(scenario, hold_bin, o)?;
        for round in 0..rounds {
            let counted = o.smoke || round > 0;
            for sys in System::ALL {
                let msg = format!("{} {} round {}/{}", scenario.name(), sys.name(), round + 1, rounds);
                if !tty {
                    // indicatif draws nothing without a terminal (CI logs): one line per step.
                    eprintln!("[{:>3}/{total}] {msg}", bar.position() + 1);
                }
                bar.set_message(msg);
                let idle_n = match sys {
                    s if s.is_lb() || s == System::Direct => o.conns,
                    _ => o.conns.min(SINGLE_PROCESS_CAP),
                };
                let hold = (scenario == Scenario::Idle).then_some(idle_n);
                let measure = || {
                    systems::start(sys, backend.addr(), hold).and_then(|running| {
                        let (addr, pids) = (running.addr(), running.pids());
                        let before = systems::joins(&running);
                        let mut sample = match scenario {
                            Scenario::Throughput1 => tools::throughput(addr, &pids, 1, o),
                            Scenario::Throughput4 => tools::throughput(addr, &pids, 4, o),
                            Scenario::Pingpong => tools::pingpong(addr, o),
                            Scenario::Connrate => tools::connrate(addr, &pids, o),
                            Scenario::Idle => tools::idle(hold_bin, &running, idle_n),
                        }?;
                        if let (Some(b), Some(a)) = (before, systems::joins(&running)) {
                            // Which plane the figures are of: the share of
                            // connections the packet plane joined.
                            let (joined, kept) = (a.0 - b.0, a.1 - b.1);
                            if joined + kept > 0 {
                                sample.insert("joined_pct".into(), 100.0 * joined as f64 / (joined + kept) as f64);
                            }
                            if scenario == Scenario::Idle && idle_n > 0 {
                                let per = systems::PACKET_MAP_BYTES_PER_CONN * joined as f64 / idle_n as f64;
                                sample.insert("map_bytes_per_conn".into(), per);
                            }
                        }
                        Ok(sample)
                    })
                };
                // One retry, with a fresh start of the system: the tools now
                // and then lose a control connection (iperf3 through nginx
                // did once in 180 runs). A second failure is reported.
                let measured = measure().or_else(|e| {
                    bar.println(format!("retrying {} on {}: {e:#}", scenario.name(), sys.name()));
                    measure()
                });
                match measured {
                    Ok(sample) if counted => results.entry(scenario).or_default().entry(sys).or_default().push(sample),
                    Ok(_) => {}
                    Err(e) => {
                        // Keep going: one failure must not throw away the rest of the run.
                        let e = format!("{} on {} (round {}): {e:#}", scenario.name(), sys.name(), round + 1);
                        bar.println(format!("FAILED {e}"));
                        errors.push(e);
                    }
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_with_message("done");
    let guard = if run_guard {
        eprintln!("guard: XDP drop rate against SYNs reaching the listener");
        match guard::guard(lb_bin, &hold_bin.with_file_name("lb-xdp-flood"), o) {
            Ok(f) => Some(f),
            Err(e) => {
                errors.push(format!("guard: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    report::derive(&mut results);
    report::write(&results, guard.as_ref(), o)?;
    if !errors.is_empty() {
        bail!("{} measurement(s) failed:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(())
}
