//! A holder process (`lb holder`, started by the supervisor, one per worker
//! slot): binds the slot's frontend sockets, keeps the connections the
//! slot's workers splice, and forwards their ends ([`crate::dataplane::holder`]).
//! It reads no configuration: its spec (stdin, one JSON line) says all it
//! needs. SIGTERM closes every connection it holds.
//!
//! On the kernel plane a holder outlives its supervisor (a crash, the OOM
//! killer): its workers die with the supervisor, but it keeps its
//! listening sockets (clients wait in their backlog) and its spliced
//! connections, which the kernel goes on splicing and it goes on closing.
//! The next `lb run` with the same `pin_path` takes it over as `lb upgrade`
//! does; `lb stop` (or SIGTERM) ends it; and once its last connection has
//! ended it exits by itself. It holds a lock file with its pid
//! (`lb_common::files::holder_lock`) by which they find it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::wait_for_signal;
use crate::{
    dataplane::holder::{Holder, WatchConf, take_over},
    kernel::maps::ConnMaps,
    proxy::accept,
};

/// What a holder gets on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HolderSpec {
    pub index: u16,
    pub pin_path: PathBuf,
    /// Where the slot's workers find it.
    pub socket: PathBuf,
    /// Concrete listen address of each frontend, in config order.
    pub listen: Vec<SocketAddr>,
    /// Whether it holds spliced connections (kernel data plane).
    pub kernel: bool,
    /// `timeouts.idle`.
    pub idle: Duration,
    /// `splice_queue_limit`.
    #[serde(default)]
    pub splice_queue_limit: u64,
    /// The supervisor's pid: a holder of the userspace plane ends with that
    /// process; one of the kernel plane outlives it.
    pub supervisor: u32,
    /// Whether a frontend joins connections on the packet plane: the holder
    /// tracks its slot's joined connections.
    #[serde(default)]
    pub packet: bool,
    /// The lock this holder holds while it runs (with its pid).
    #[serde(default)]
    pub lock: PathBuf,
    /// Take the listeners and connections from the holder of an earlier
    /// binary or instance serving at `socket` (`lb upgrade`, `lb run` after
    /// a crash) instead of binding.
    #[serde(default)]
    pub takeover: bool,
    /// Where to write the heartbeat the supervisor's watchdog reads, and
    /// how often (`timeouts.worker` / 4).
    #[serde(default)]
    pub beat: Option<(PathBuf, Duration)>,
}

/// The line a holder prints once it serves.
#[derive(Debug, Serialize, Deserialize)]
pub struct HolderReady {
    pub pid: u32,
    /// Connections taken over from the old holder (`takeover`).
    #[serde(default)]
    pub took: usize,
}

/// `lb holder`.
pub async fn run() -> anyhow::Result<()> {
    let (spec, _stdin) = super::child_spec("holder", |s: &HolderSpec| s.supervisor, |s| s.kernel).await?;
    super::refused_by_test("holder", spec.index)?;
    // Two descriptors per connection held; the limit warning is the workers'.
    let _ = crate::kernel::sys::raise_nofile_limit();
    let pin_path = spec.kernel.then_some(spec.pin_path.as_path());
    let every = spec.beat.as_ref().map_or(Duration::MAX, |b| b.1);
    let conf = WatchConf {
        idle: spec.idle,
        queue: spec.splice_queue_limit,
        slot: spec.index,
        beat: every,
        packet: spec.packet,
    };
    let (mut holder, took, _lock) = if spec.takeover {
        // `lb upgrade`, or `lb run` after a crash: everything comes from the
        // slot's holder of the earlier instance, which exits once it has
        // committed the hand-over (and so lets go of the slot's lock).
        let (holder, took) = take_over(&spec.socket, pin_path, conf).context("taking over from the old holder")?;
        (holder, took, lock(&spec.lock, TAKE_LOCK_WAIT))
    } else {
        let lock = lock(&spec.lock, Duration::ZERO);
        if let Some(Err(pid)) = &lock {
            anyhow::bail!("the holder of slot {} runs already (pid {pid})", spec.index);
        }
        let listeners = spec
            .listen
            .iter()
            .map(|a| {
                let l = accept::bind(*a, true).with_context(|| format!("listen {a}"))?;
                Ok(l.into_std()?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(p) = pin_path {
            let mut m =
                ConnMaps::open(p).map_err(|e| anyhow::anyhow!("opening the pinned maps at {}: {e}", p.display()))?;
            let stale = m.forget_worker(spec.index, &Default::default());
            if stale > 0 {
                log::info!("removed {stale} connection records left by an earlier holder of slot {}", spec.index);
            }
        }
        (Holder::new(listeners, pin_path, conf)?, 0, lock)
    };
    if let Some(Err(pid)) = &_lock {
        log::warn!("the lock {} is still held by pid {pid}: `lb stop` will not find this holder", spec.lock.display());
    }
    holder.bind(&spec.socket).with_context(|| format!("holder socket {}", spec.socket.display()))?;
    if let Some((path, every)) = &spec.beat {
        holder.beat_to(path, *every).with_context(|| format!("heartbeat file {}", path.display()))?;
    }
    let holder = Arc::new(holder);
    let h = holder.clone();
    std::thread::Builder::new().name("lb-holder".into()).spawn(move || h.serve())?;
    super::write_line(&serde_json::to_string(&HolderReady { pid: std::process::id(), took })?)
        .context("telling the supervisor this holder is ready")?;
    let signal = wait_for_signal();
    tokio::pin!(signal);
    if spec.kernel {
        // The close watcher beats.
        tokio::select! {
            r = &mut signal => r?,
            () = supervisor_gone(spec.supervisor) => {
                log::warn!(
                    "the supervisor (pid {}) is gone: keeping the {} spliced connection(s) and the listening \
                     sockets of slot {} until `lb run` with this pin_path takes them over (`lb stop` closes them); \
                     this holder exits once its last connection has ended",
                    spec.supervisor,
                    holder.held(),
                    spec.index,
                );
                holder.orphan();
                if orphaned(&holder, &mut signal).await? {
                    log::info!("the last connection has ended and no lb took this holder over; exiting");
                    remove_files(&spec);
                    return Ok(());
                }
            }
        }
    } else {
        // Without a close watcher (userspace plane), this loop beats.
        let mut beat = tokio::time::interval(every.min(Duration::from_secs(3600)));
        loop {
            tokio::select! {
                r = &mut signal => break r?,
                _ = beat.tick() => holder.tick(),
            }
        }
    }
    holder.stop();
    remove_files(&spec);
    log::info!("holder stopped");
    Ok(())
}

/// Removes the files of a holder that ends (not of one that handed over:
/// they are its successor's now): its socket, lock and heartbeat.
fn remove_files(spec: &HolderSpec) {
    let _ = std::fs::remove_file(&spec.socket);
    let _ = std::fs::remove_file(&spec.lock);
    if let Some((path, _)) = &spec.beat {
        let _ = std::fs::remove_file(path);
    }
}

/// How long a holder that took over waits for the old one to let go of the slot's lock.
const TAKE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often an orphaned holder looks whether it is done, and a holder
/// whether its supervisor is there.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Takes the lock at `path` (waiting up to `within` for its holder to let
/// go): `Some(Err(pid))` if another process still holds it, `None` with no
/// path (or when the file cannot be opened: logged).
fn lock(path: &Path, within: Duration) -> Option<Result<crate::kernel::lock::Lock, u32>> {
    if path.as_os_str().is_empty() {
        return None;
    }
    let deadline = std::time::Instant::now() + within;
    loop {
        match crate::kernel::lock::take(path) {
            Ok(Ok(l)) => return Some(Ok(l)),
            Ok(Err(pid)) if std::time::Instant::now() >= deadline => return Some(Err(pid.unwrap_or(0))),
            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log::warn!("holder lock {}: {e}", path.display());
                return None;
            }
        }
    }
}

/// Resolves once the supervisor `pid` is no longer this process's parent
/// (it died, and this process was given to another).
async fn supervisor_gone(pid: u32) {
    let parent = || rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    while parent() == Some(pid) {
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// An orphaned holder's wait: `Ok(true)` once nothing is left to keep,
/// `Ok(false)` on SIGTERM/SIGINT (the caller closes what is held).
async fn orphaned(
    holder: &Holder,
    signal: &mut (impl std::future::Future<Output = anyhow::Result<()>> + Unpin),
) -> anyhow::Result<bool> {
    let mut look = tokio::time::interval(LOOK_EVERY);
    loop {
        tokio::select! {
            r = &mut *signal => {
                r?;
                return Ok(false);
            }
            _ = look.tick() => {
                if holder.orphaned_and_done() {
                    return Ok(true);
                }
            }
        }
    }
}
