//! `cargo xtask <setup|demo|test>`: the one entry point for people and CI.

mod bench;
mod demo;
mod hold;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "lb's developer and CI entry point")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything lb needs (idempotent): nightly rust-src, bpf-linker, bpftool, bpffs.
    Setup,
    /// Build, then run lb on loopback with backends and thousands of clients, and print stats.
    Demo {
        /// Concurrent clients.
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Benchmark lb (kernel and userspace) against a direct connection, HAProxy and nginx.
    Bench {
        /// Every scenario briefly (well under a minute): proves the bench runs, measures nothing.
        #[arg(long)]
        smoke: bool,
        /// Counted rounds per system (after one warm-up round).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per measurement (whole seconds for iperf3, sockperf and wrk).
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Idle connections for the memory scenario (lb and direct; single-process proxies are capped at 9000).
        #[arg(long, default_value_t = 50_000)]
        conns: usize,
        /// Where results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only these scenarios: throughput_1, throughput_4, pingpong, connrate, idle, guard.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Hold N idle connections through lb to one backend ip:port and report ports, memory and time.
    Hold {
        /// Connections to hold.
        #[arg(long, default_value_t = 40_000)]
        conns: usize,
        /// Source addresses in lb's pool (127.0.1.1 up).
        #[arg(long, default_value_t = 4)]
        pool: usize,
        /// Data plane: kernel, packet (the kernel plane with `splice = "packet"`) or userspace; direct: the
        /// same clients straight to the backend, no lb.
        #[arg(long, default_value = "kernel")]
        dataplane: String,
        /// Once they are held, run `lb upgrade` (to the same binary) and report its time and the connections lost.
        #[arg(long)]
        upgrade: bool,
        /// Print which kernel slab caches grew, per connection held (/proc/slabinfo).
        #[arg(long)]
        slab: bool,
    },
    /// Run every check and test: fmt, clippy, unit and integration tests on both data planes.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one line summing
/// every `test result:` line (cargo's own last line is often a 0-test doc run).
/// A test that could not run prints a `SKIP` line (only with
/// `LB_SKIP_KERNEL_TESTS=1`, never under `CI=true`); cargo counts it as
/// passed, the summary counts it as skipped.
fn run_tests(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("starting {shown}"))?;
    let (mut passed, mut failed, mut ignored, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("piped stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("SKIP ") {
            skipped += 1;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (w.next(), w.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {} passed, {failed} failed, {} skipped", passed.saturating_sub(skipped), ignored + skipped);
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_owned()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Formats a benchmark figure: no decimals from 100, 2 from 1, `small` below.
pub fn format_figure(x: f64, small: usize) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.small$}")
    }
}

/// Builds the release `lb` binary and returns its path.
pub fn build_lb() -> anyhow::Result<std::path::PathBuf> {
    run(cargo().args(["build", "--release", "-p", "lb-user", "--bin", "lb"]))?;
    Ok(workspace_root().join("target/release/lb"))
}

/// Errors end with their message and causes, without the backtrace
/// `RUST_BACKTRACE` (set in CI) would add: the last lines of a failed
/// `cargo xtask test` then say what failed.
fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Demo { clients, seconds } => {
            setup::setup()?;
            let lb = build_lb()?;
            demo::demo(&lb, clients, seconds)
        }
        Cmd::Bench { smoke, runs, secs, conns, out, only } => {
            setup::setup()?;
            let lb = build_lb()?;
            let hold = hold::build_hold()?;
            let opts = if smoke {
                bench::Opts::smoke(only)
            } else {
                bench::Opts { smoke, only, runs: runs.max(1), secs, conns, out: workspace_root().join(out) }
            };
            bench::bench(&lb, &hold, &opts)
        }
        Cmd::Hold { conns, pool, dataplane, upgrade, slab } => {
            setup::setup()?;
            let lb = build_lb()?;
            let hold = hold::build_hold()?;
            hold::hold(&lb, &hold, &hold::Args { conns, pool, dataplane, upgrade, slab }).map(drop)
        }
        Cmd::Test { args } => {
            setup::setup()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            let lb = build_lb()?;
            let mut t = cargo();
            t.args(["test", "--release", "--workspace"]).env("LB_BIN", &lb);
            // --show-output: the data-path tests report lb's memory and CPU figures.
            t.args(["--", "--show-output"]).args(&args);
            run_tests(&mut t)?;
            if args.is_empty() {
                // The benchmark must keep working: every scenario, briefly.
                let hold = hold::build_hold()?;
                let opts = bench::Opts::smoke(vec![]);
                bench::bench(&lb, &hold, &opts).context("cargo xtask bench --smoke")?;
                println!("bench smoke: passed");
            }
            Ok(())
        }
    }
}
