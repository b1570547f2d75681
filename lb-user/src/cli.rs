//! Command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    config::{Config, DataplaneMode},
    dataplane::PinnedMaps,
};

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
        /// Print one JSON line on stdout (bound addresses, data plane) once serving.
        #[arg(long)]
        announce: bool,
    },
    /// Validate a configuration file; exit non-zero with FILE:LINE: message if it is wrong.
    Check {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the kernel data plane's counters from the pinned maps of a running lb.
    Stats {
        /// The running instance's `pin_path`.
        #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
        pin_path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok ({} frontend(s), {} backend(s), {} server(s), dataplane = {})",
                config.display(),
                cfg.frontends.len(),
                cfg.backends.len(),
                cfg.backends.iter().map(|b| b.servers.len()).sum::<usize>(),
                cfg.dataplane
            );
            Ok(())
        }
        Command::Run { config, dataplane, announce } => {
            let mut cfg = Config::load(&config)?;
            if let Some(d) = dataplane {
                cfg.dataplane = d;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("lb-worker")
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(crate::proxy::run(cfg, announce))
        }
        Command::Stats { pin_path, json } => {
            let maps = PinnedMaps::open(&pin_path).with_context(|| {
                format!(
                    "no running kernel data plane at {} (is `lb run` up with dataplane kernel?)",
                    pin_path.display()
                )
            })?;
            let s = maps.snapshot()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let c = s.counters;
                println!("{:<20} {:>16}", "spliced sockets", s.spliced_sockets);
                println!("{:<20} {:>16}", "skbs redirected", c.skbs_redirected);
                println!("{:<20} {:>16}", "bytes redirected", c.bytes_redirected);
                println!("{:<20} {:>16}", "peer missing", c.peer_missing);
            }
            Ok(())
        }
    }
}
