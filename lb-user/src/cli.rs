//! Command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use std::net::SocketAddr;

use crate::{
    config::{Config, DataplaneMode, MAX_WORKERS, Overrides},
    control::Request,
    instance::Reload,
    observe::{read, render},
    servers::command::Command,
};

/// `lb --version`: the release and the eBPF object built into it.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (eBPF object sha256 ", env!("LB_EBPF_SHA256"), ")");

/// A TCP load balancer for very many long-lived connections: bytes between
/// client and server are spliced inside the kernel with eBPF sockmap.
#[derive(Debug, Parser)]
#[command(name = "lb", version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the load balancer in the foreground until SIGINT or SIGTERM (taking over the connections of an lb
    /// killed at the same pin_path, whose holders still keep them).
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
        #[command(flatten)]
        run: RunDir,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds (0.1 to 3600, default 1) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = watch_interval)]
        watch: Option<std::time::Duration>,
    },
    /// List live kernel-spliced connections (client, server, source, age, idle, bytes) from the pinned maps.
    Conns {
        /// The running instance's `pin_path`.
        #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
        pin_path: PathBuf,
        #[command(flatten)]
        run: RunDir,
        /// Only connections to this server (ip:port).
        #[arg(long, value_name = "ADDR")]
        server: Option<SocketAddr>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change the servers of a running lb (through its control socket); takes effect at once.
    Server {
        #[command(subcommand)]
        action: ServerAction,
        #[command(flatten)]
        target: Target,
    },
    /// Read or change the XDP guard's deny and allow lists of a running lb (until the next reload).
    Guard {
        #[command(subcommand)]
        action: GuardAction,
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the running lb's configuration file and apply its server changes (same as SIGHUP).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Replace the running lb with a new binary, keeping every spliced connection and the listening sockets
    /// (same as SIGUSR2 to `lb run`, which uses its own path).
    Upgrade {
        /// The new executable [default: the running one's path, read again from disk].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the lb at a pin path: its supervisor (SIGTERM, as `systemctl stop` does), and holders that a
    /// supervisor which died left behind with their connections (closing them); then remove pins left behind.
    Stop {
        /// The instance's `pin_path`.
        #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
        pin_path: PathBuf,
        #[command(flatten)]
        run: RunDir,
    },
    /// Internal: the supervisor of a new binary, started by `lb upgrade` (spec on stdin).
    #[command(hide = true)]
    Takeover,
    /// Internal: a worker process started by `lb run` (spec on stdin).
    #[command(hide = true)]
    Worker,
    /// Internal: the holder of a worker slot's listeners and spliced connections, started by `lb run`.
    #[command(hide = true)]
    Holder,
}

/// Where the running instance keeps its lock, metadata and control socket.
#[derive(Debug, clap::Args)]
pub struct RunDir {
    /// The running instance's `runtime_dir` [default: $RUNTIME_DIRECTORY, else /run/lb].
    #[arg(long, value_name = "DIR", global = true)]
    runtime_dir: Option<PathBuf>,
}

impl RunDir {
    fn get(&self) -> PathBuf {
        self.runtime_dir.clone().unwrap_or_else(lb_common::files::default_run_dir)
    }
}

/// Which running lb to talk to.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The running instance's `pin_path` (its control socket is <runtime_dir>/<pin_path mangled>.sock).
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR", global = true)]
    pin_path: PathBuf,
    #[command(flatten)]
    run: RunDir,
    /// The control socket, when the config sets `control_socket`.
    #[arg(long, value_name = "PATH", global = true)]
    control_socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| crate::control::default_path(&self.run.get(), &self.pin_path))
    }
}

#[derive(Debug, Subcommand)]
pub enum ServerAction {
    /// Add a server to a backend.
    Add {
        backend: String,
        addr: SocketAddr,
        /// Share of new connections (0-256).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Connections this server takes at most (others queue).
        #[arg(long)]
        maxconn: Option<u32>,
    },
    /// Remove a server: no new connections; existing ones continue until they end.
    Remove { backend: String, addr: SocketAddr },
    /// No new connections; existing ones continue until they end.
    Drain { backend: String, addr: SocketAddr },
    /// Take new connections again (after drain or disable).
    Enable { backend: String, addr: SocketAddr },
    /// Maintenance: no new connections; existing ones continue.
    Disable { backend: String, addr: SocketAddr },
    /// Set the server's weight (0-256; 0 takes no new connections).
    Weight { backend: String, addr: SocketAddr, weight: u32 },
}

impl ServerAction {
    fn command(self) -> Command {
        use crate::{addr::ServerAddr as A, servers::server::Admin};
        match self {
            Self::Add { backend, addr, weight, maxconn } => {
                Command::ServerAdd { backend, addr: A(addr), weight, maxconn }
            }
            Self::Remove { backend, addr } => Command::ServerRemove { backend, addr: A(addr) },
            Self::Drain { backend, addr } => Command::ServerState { backend, addr: A(addr), state: Admin::Drain },
            Self::Enable { backend, addr } => Command::ServerState { backend, addr: A(addr), state: Admin::Enabled },
            Self::Disable { backend, addr } => Command::ServerState { backend, addr: A(addr), state: Admin::Disabled },
            Self::Weight { backend, addr, weight } => Command::ServerWeight { backend, addr: A(addr), weight },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum GuardAction {
    /// The lists, the counters and the sources dropped most.
    Show,
    /// Sources to drop (CIDR or address).
    Deny {
        #[command(subcommand)]
        change: ListChange,
    },
    /// Sources always let through, deny and rate aside.
    Allow {
        #[command(subcommand)]
        change: ListChange,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListChange {
    Add { cidr: String },
    Remove { cidr: String },
}

impl GuardAction {
    fn command(self) -> crate::control::GuardCmd {
        use crate::{control::GuardCmd, kernel::guard::List};
        let change = |list, c: ListChange| match c {
            ListChange::Add { cidr } => GuardCmd::Add { list, cidr },
            ListChange::Remove { cidr } => GuardCmd::Remove { list, cidr },
        };
        match self {
            Self::Show => GuardCmd::Show,
            Self::Deny { change: c } => change(List::Deny, c),
            Self::Allow { change: c } => change(List::Allow, c),
        }
    }
}

/// `--watch SECS`: a number of seconds from 0.1 to 3600.
fn watch_interval(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("\"{s}\" is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s} seconds: must be between 0.1 and 3600"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn control(target: &Target, req: Request) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = rt.block_on(crate::control::request(&target.socket(), &req))?;
    if reply.ok { out(format_args!("{}\n", reply.message)) } else { anyhow::bail!("{}", reply.message) }
}

/// Writes to stdout. A reader that went away (`lb stats | head -1`) ends
/// the command quietly, with status 0, as it ends `cat`; any other
/// failure is an error.
fn out(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r.context("writing to stdout"),
    }
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
        Cmd::Check { config } => {
            let (cfg, _, running) = load_probed(&config, &Overrides::default())?;
            if let Some(pid) = running {
                out(format_args!(
                    "note: lb (pid {pid}) runs with pin_path {}: its listen addresses are busy with its own \
                     listeners, so they were not probed\n",
                    cfg.pin_path.display()
                ))?;
            }
            out(format_args!(
                "{}: ok ({} frontend(s), {} backend(s), {} server(s), dataplane = {}, workers = {}, maxconn = {})\n",
                config.display(),
                cfg.frontends.len(),
                cfg.backends.len(),
                cfg.backends.iter().map(|b| b.servers.len()).sum::<usize>(),
                cfg.dataplane,
                cfg.workers,
                cfg.maxconn
            ))?;
            let human = crate::config::memory::human;
            let limit = if cfg.splice_queue_limit == 0 { "0".to_owned() } else { human(cfg.splice_queue_limit) };
            out(format_args!(
                "kernel maps: {} at their capacities, of kernel_memory = \"{}\"; splice_queue_limit = \"{limit}\"\n",
                human(cfg.memory.bytes()),
                human(cfg.kernel_memory)
            ))
        }
        Cmd::Run { config, dataplane, workers, announce } => {
            let overrides = Overrides { workers, dataplane, maxconn: None };
            // Busy ports are an error with their line now, unless this
            // pin_path's instance runs (its lock says so just after).
            let (cfg, text, _) = load_probed(&config, &overrides)?;
            let reload = Reload { path: config, overrides };
            runtime()?.block_on(crate::instance::supervisor::run(cfg, reload, text, announce))
        }
        Cmd::Worker => {
            // The task reading commands from stdin sits in a blocking read
            // until the supervisor closes the pipe: do not wait for it.
            let rt = runtime()?;
            let r = rt.block_on(crate::instance::worker::run());
            rt.shutdown_background();
            r
        }
        Cmd::Holder => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let r = rt.block_on(crate::instance::holder::run());
            rt.shutdown_background();
            r
        }
        Cmd::Server { action, target } => control(&target, Request::Apply(action.command())),
        Cmd::Guard { action, target } => control(&target, Request::Guard { cmd: action.command() }),
        Cmd::Reload { target } => control(&target, Request::Other { cmd: crate::control::Other::Reload }),
        Cmd::Upgrade { binary, target } => {
            // A relative path means the caller's directory, not lb's.
            let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            control(&target, Request::Upgrade { upgrade: crate::control::UpgradeReq { binary } })
        }
        Cmd::Takeover => runtime()?.block_on(crate::instance::takeover::take_over()),
        Cmd::Stop { pin_path, run } => {
            println!("{}", crate::instance::adopt::stop(&run.get(), &pin_path)?);
            Ok(())
        }
        Cmd::Stats { pin_path, run, json, watch } => {
            let run_dir = run.get();
            ensure_running(&run_dir, &pin_path)?;
            let read = || {
                read::read(&pin_path, &run_dir).with_context(|| {
                    format!(
                        "no running lb with pinned maps at {} (is `lb run` up, with that pin_path?)",
                        pin_path.display()
                    )
                })
            };
            let show = |r: &read::Report| -> anyhow::Result<String> {
                Ok(if json { serde_json::to_string_pretty(r)? + "\n" } else { render::stats(r) })
            };
            match watch {
                None => out(format_args!("{}", show(&read()?)?))?,
                Some(every) => {
                    loop {
                        // The instance may stop while watched: say so rather than freeze its last figures.
                        ensure_running(&run_dir, &pin_path)?;
                        let text = show(&read()?)?;
                        // Clear the screen and home the cursor, then redraw.
                        out(format_args!("\x1b[2J\x1b[H{text}"))?;
                        std::thread::sleep(every);
                    }
                }
            }
            Ok(())
        }
        Cmd::Conns { pin_path, run, server, json } => {
            ensure_running(&run.get(), &pin_path)?;
            let maps = crate::kernel::maps::PinnedMaps::open(&pin_path)
                .with_context(|| format!("no running lb with pinned maps at {}", pin_path.display()))?;
            if !maps.kernel {
                anyhow::bail!(
                    "lb at {} runs the userspace data plane, which keeps no connection table; `lb stats` has its counts",
                    pin_path.display()
                );
            }
            let rows = crate::observe::conns::conns(&pin_path, server)?;
            if json {
                out(format_args!("{}\n", serde_json::to_string_pretty(&rows)?))?;
            } else {
                out(format_args!("{}", render::conns(&rows)))?;
            }
            Ok(())
        }
    }
}

/// Loads and validates `path`, then parses it again probing each listen
/// address with a test bind (the host's other facts, checked by the first
/// pass, are not asked again), so that a busy one is an error naming its
/// line, as `lb run` would refuse it. Not when a live lb holds this
/// `pin_path` (the ports are its own): then its pid is returned.
fn load_probed(path: &std::path::Path, o: &Overrides) -> anyhow::Result<(Config, String, Option<u32>)> {
    let (cfg, text) = Config::load_with(path, o)?;
    let lock = lb_common::files::run_file(&cfg.runtime_dir, &cfg.pin_path, "lock");
    if let Some((true, pid)) = crate::kernel::lock::holder(&lock) {
        return Ok((cfg, text, Some(pid.unwrap_or(0))));
    }
    // Holders whose supervisor is gone keep the listening sockets (`lb run` takes them over).
    if let Some(h) = crate::instance::adopt::live_holders(&cfg.runtime_dir, &cfg.pin_path).first() {
        return Ok((cfg, text, Some(h.pid)));
    }
    let cfg = Config::parse_on(&crate::config::host::Probing, &path.display().to_string(), &text, o)?;
    Ok((cfg, text, None))
}

/// Refuses to report from the pins of an instance that is gone: their
/// counts would read as a running instance's.
fn ensure_running(run_dir: &std::path::Path, pin_path: &std::path::Path) -> anyhow::Result<()> {
    let lock = lb_common::files::run_file(run_dir, pin_path, "lock");
    let Some((false, pid)) = crate::kernel::lock::holder(&lock) else {
        // Held: it runs. No lock file: nothing ran here, or an instance too
        // old to write one; reading says which.
        return Ok(());
    };
    let holders: Vec<u32> = crate::instance::adopt::live_holders(run_dir, pin_path).iter().map(|h| h.pid).collect();
    anyhow::ensure!(
        !holders.is_empty(),
        "lb at {} is not running (stale pins{}); `lb run` with this pin_path removes them",
        pin_path.display(),
        pid.map(|p| format!(" from pid {p}")).unwrap_or_default()
    );
    eprintln!(
        "note: the supervisor of lb at {}{} is gone; its holder(s) (pids {holders:?}) keep its spliced \
         connections: `lb run` with its configuration takes them over, `lb stop` closes them",
        pin_path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
