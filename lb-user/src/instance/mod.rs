//! The processes of an instance. `lb run` starts the supervisor
//! ([`supervisor`]): it owns the eBPF object and its pins, the control
//! socket, the metrics endpoint and the health checks ([`owner`]), and runs
//! the workers ([`worker`]), which accept and serve connections, and for
//! each worker slot a holder ([`holder`]), which keeps the slot's listening
//! sockets and spliced connections while workers come and go. Even with
//! `workers = 1` the worker and its holder are processes of their own.

pub mod adopt;
mod children;
pub mod holder;
pub mod owner;
mod restart;
mod state;
pub mod supervisor;
pub mod takeover;
pub mod upgrade;
mod watchdog;
pub mod worker;

use std::net::SocketAddr;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    config::{FD_RESERVE, Overrides, fds_needed},
    dataplane::Kind,
    kernel::sys,
};

/// What `lb run --announce` prints on stdout once it serves traffic, and
/// each worker tells its supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub event: String,
    pub pid: u32,
    pub dataplane: Kind,
    pub frontends: Vec<ReadyFrontend>,
    /// Worker processes.
    #[serde(default)]
    pub workers: Vec<u32>,
    /// Holder processes, one per worker slot (same order).
    #[serde(default)]
    pub holders: Vec<u32>,
    /// Where the metrics endpoint listens, if configured.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadyFrontend {
    pub name: String,
    pub listen: SocketAddr,
}

/// The file a reload reads, with the command line's overrides.
pub struct Reload {
    pub path: std::path::PathBuf,
    pub overrides: Overrides,
}

/// Raises the soft open-files limit to the hard one and warns when this
/// process's share of `maxconn` cannot fit.
pub fn raise_fd_limit(maxconn_here: u32) {
    match sys::raise_nofile_limit() {
        Ok((soft, _)) => {
            if soft < fds_needed(maxconn_here) {
                log::warn!(
                    "open-files limit is {soft}: at most ~{} connections fit in this process (it may take \
                     {maxconn_here}); raise LimitNOFILE or add workers",
                    soft.saturating_sub(FD_RESERVE) / 2,
                );
            }
        }
        Err(e) => log::warn!("cannot read or raise the open-files limit: {e}"),
    }
}

/// The lines of a child's stdin (worker, holder): its spec, then commands.
pub type Stdin = tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>;

/// A child's start (`lb worker`, `lb holder`): reads its `what` spec, the
/// first line of stdin, and, unless `outlives` says this child outlives its
/// supervisor (a holder of spliced connections), arms its end with the
/// supervisor (SIGTERM when it dies), whose pid `supervisor` takes from the
/// spec (checked after arming, in case it is gone already). Returns the
/// spec and the rest of stdin.
pub async fn child_spec<T: serde::de::DeserializeOwned>(
    what: &str,
    supervisor: impl Fn(&T) -> u32,
    outlives: impl Fn(&T) -> bool,
) -> anyhow::Result<(T, Stdin)> {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await.context("reading the spec")?.context("no spec on stdin")?;
    let spec: T = serde_json::from_str(&first).with_context(|| format!("the {what} spec on stdin is not valid"))?;
    if !outlives(&spec) {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
            .context("arming the parent-death signal")?;
    }
    let pid = supervisor(&spec);
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(pid) {
        anyhow::bail!("the supervisor (pid {pid}) is gone");
    }
    Ok((spec, lines))
}

/// Test hook: with `LB_TEST_REFUSE_START=FILE`, a worker or holder whose
/// role and slot (`worker 0`, `holder 1`) is a line of FILE fails as it
/// starts, before its ready line, as a child that cannot start would. FILE
/// is read at each start, so a test makes restarts fail, then work again.
pub fn refused_by_test(role: &str, index: u16) -> anyhow::Result<()> {
    let Some(file) = std::env::var_os("LB_TEST_REFUSE_START") else { return Ok(()) };
    let me = format!("{role} {index}");
    if std::fs::read_to_string(file).unwrap_or_default().lines().any(|l| l.trim() == me) {
        anyhow::bail!("LB_TEST_REFUSE_START: {me} refuses to start (a test setting)");
    }
    Ok(())
}

/// Writes `line` and a newline to stdout (a child's ready line and
/// answers to its supervisor, `lb run --announce`'s ready line), as an
/// error rather than a panic when no one reads any more.
pub fn write_line(line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
    Ok(())
}
