//! Command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{Config, DataplaneMode, MAX_WORKERS, Overrides};

/// A TCP load balancer for very many long-lived connections: bytes between
/// client and server are spliced inside the kernel with eBPF sockmap.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer in the foreground until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Override the file's `dataplane` key.
        #[arg(long, value_enum)]
        dataplane: Option<DataplaneMode>,
        /// Override the file's `workers` key: processes sharing the listeners with SO_REUSEPORT.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WORKERS)))]
        workers: Option<u32>,
        /// Print one JSON line on stdout (bound addresses, data plane, worker pids) once serving.
        #[arg(long)]
        announce: bool,
    },
    /// Validate a configuration file; exit non-zero with FILE:LINE: message if it is wrong.
    Check {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show connections, servers and source ports of a running lb, from its pinned maps.
    Stats {
        /// The running instance's `pin_path`.
        #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
        pin_path: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Internal: a worker process started by `lb run` with workers > 1 (spec on stdin).
    #[command(hide = true)]
    Worker,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lb-worker")
        .build()
        .context("starting the tokio runtime")
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok ({} frontend(s), {} backend(s), {} server(s), dataplane = {}, workers = {}, maxconn = {})",
                config.display(),
                cfg.frontends.len(),
                cfg.backends.len(),
                cfg.backends.iter().map(|b| b.servers.len()).sum::<usize>(),
                cfg.dataplane,
                cfg.workers,
                cfg.maxconn
            );
            Ok(())
        }
        Command::Run { config, dataplane, workers, announce } => {
            let (cfg, text) = Config::load_with(&config, &Overrides { workers, dataplane })?;
            if cfg.workers > 1 {
                runtime()?.block_on(crate::supervisor::run(cfg, config.display().to_string(), text, announce))
            } else {
                runtime()?.block_on(crate::proxy::run(cfg, announce))
            }
        }
        Command::Worker => runtime()?.block_on(crate::supervisor::worker()),
        Command::Stats { pin_path, json } => {
            let r = crate::report::read(&pin_path).with_context(|| {
                format!(
                    "no running lb with pinned maps at {} (is `lb run` up, with that pin_path?)",
                    pin_path.display()
                )
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", crate::report::render(&r));
            }
            Ok(())
        }
    }
}
