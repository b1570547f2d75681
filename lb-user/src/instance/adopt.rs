//! `lb run` where the supervisor of an earlier instance died (kill -9, a
//! crash, the OOM killer) while its holders kept their listening sockets
//! and spliced connections (kernel plane: holders outlive their
//! supervisor, workers do not). The new instance takes everything over the
//! way `lb upgrade` does: the pins (with this binary's programs put in
//! place of the old ones), and slot by slot the old holder's listeners and
//! connections, which a new holder takes through the old one's socket
//! (`dataplane::holder::take_over`).
//!
//! It does so only if the earlier instance is one it can serve: same map
//! layout, the kernel data plane, the same frontends, no slot beyond its
//! `workers`, maps that hold its listen backlogs (and guard). Otherwise it
//! says why, stops the old holders (which closes their connections) and
//! starts anew, as it always did after a crash. The maps keep the
//! capacities the earlier instance gave them, and `maxconn` keeps to what
//! they hold ([`on_pinned_maps`], also for `lb upgrade`).
//! `lb stop` ([`stop`]) ends such holders without starting anything.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rustix::process::Signal;

use super::{Reload, children::spawn_holder, holder::HolderSpec};
use crate::{
    config::{Config, DataplaneMode, FrontendConfig, MAX_WORKERS, Overrides, host::AlreadyChecked},
    kernel::{
        KernelError, lock,
        object::{Meta, Objects, run_file},
    },
};

/// A live holder of an earlier instance: its worker slot, pid and lock.
#[derive(Clone, Debug)]
pub struct Survivor {
    pub slot: u16,
    pub pid: u32,
    lock: PathBuf,
}

impl Survivor {
    /// Whether it still holds its lock (it runs).
    fn alive(&self) -> bool {
        holds(&self.lock, self.pid)
    }

    fn signal(&self, sig: Signal) {
        signal_holder_of(&self.lock, self.pid, sig);
    }
}

/// Whether process `pid` holds the lock at `path`.
fn holds(path: &Path, pid: u32) -> bool {
    matches!(lock::holder(path), Some((true, Some(p))) if p == pid)
}

/// Sends `sig` to process `pid`, which holds the lock at `path` and is no
/// child of this one (an earlier instance's holder or supervisor), through
/// a pidfd opened before the lock is checked: so never to a process that
/// got the pid after it ended. Whether it was sent.
fn signal_holder_of(path: &Path, pid: u32, sig: Signal) -> bool {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else { return false };
    let Ok(fd) = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) else { return false };
    holds(path, pid) && rustix::process::pidfd_send_signal(&fd, sig).is_ok()
}

/// The holders alive for `pin_path` (each holds its slot's lock).
pub fn live_holders(run_dir: &Path, pin_path: &Path) -> Vec<Survivor> {
    (0..MAX_WORKERS as u16)
        .filter_map(|slot| {
            let lock = lb_common::files::holder_lock(run_dir, pin_path, slot);
            match lock::holder(&lock) {
                Some((true, Some(pid))) => Some(Survivor { slot, pid, lock }),
                _ => None,
            }
        })
        .collect()
}

/// What `lb run` takes over: the earlier instance's metadata and holders.
pub(super) struct Earlier {
    pub(super) meta: Meta,
    pub(super) holders: Vec<Survivor>,
    /// The `maxconn` its maps hold, if less than the configuration's.
    pub(super) maxconn: Option<u32>,
}

impl Earlier {
    /// The pid of slot `i`'s old holder, if it was alive.
    pub(super) fn holder_of(&self, i: usize) -> Option<u32> {
        self.holders.iter().find(|h| usize::from(h.slot) == i).map(|h| h.pid)
    }
}

/// The map layout this binary was built for (`LB_TEST_PRETEND_LAYOUT`, a
/// test hook, appends to it: the binary then believes the maps differ).
pub(super) fn our_layout() -> String {
    let mut ours = lb_common::maps::layout();
    if let Ok(v) = std::env::var("LB_TEST_PRETEND_LAYOUT") {
        ours.push_str(&v);
    }
    ours
}

/// Looks for an earlier instance at `cfg.pin_path` whose supervisor is
/// gone and whose holders live. `Some`: taken over (pins, programs, lock);
/// start its slots with [`take_holder`]. `None`: there is none, or it
/// cannot be taken over (then its holders are stopped, said why, and the
/// caller starts anew: `Objects::load` removes the stale pins).
pub(super) fn look(cfg: &Config) -> anyhow::Result<Option<(Objects, Earlier)>> {
    let (run_dir, pin_path) = (&cfg.runtime_dir, &cfg.pin_path);
    if let Some((true, _)) = lock::holder(&run_file(run_dir, pin_path, "lock")) {
        // A live instance: loading says so.
        return Ok(None);
    }
    let holders = live_holders(run_dir, pin_path);
    // Connections joined on the packet plane need no process: the program
    // and the flows stay pinned when every process of lb's is gone.
    let joined = crate::kernel::flows::FlowMaps::open(pin_path).map_or(0, |f| f.entries() / 2);
    if holders.is_empty() && joined == 0 {
        return Ok(None);
    }
    let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    let refuse = |why: &str| {
        log::error!(
            "the earlier lb at {} left {} holder(s) (pids {pids:?}) and {joined} joined connection(s), but this one \
             cannot take them over: {why}; stopping them (their connections are closed) and starting anew",
            pin_path.display(),
            holders.len(),
        );
        stop_holders(&holders);
    };
    let meta = match Meta::read(run_dir, pin_path) {
        Some(m) => m,
        None => {
            refuse(&format!("it left no metadata at {}", run_file(run_dir, pin_path, "json").display()));
            return Ok(None);
        }
    };
    if let Some(why) = why_not(&meta, cfg, &holders) {
        refuse(&why);
        return Ok(None);
    }
    let maxconn = match on_pinned_maps(cfg, true) {
        Ok(m) => m,
        Err(why) => {
            refuse(&format!("its maps cannot hold this configuration: {why}"));
            return Ok(None);
        }
    };
    match Objects::adopt_orphaned(run_dir, pin_path, meta.clone()) {
        Ok(objects) => {
            log::info!(
                "taking over the earlier lb at {} (supervisor pid {} is gone): {} holder(s) alive, pids {pids:?}; \
                 {joined} joined connection(s)",
                pin_path.display(),
                meta.pid,
                holders.len()
            );
            Ok(Some((objects, Earlier { meta, holders, maxconn })))
        }
        Err(e @ KernelError::PinPathBusy { .. }) => Err(e.into()),
        Err(e) => {
            refuse(&e.to_string());
            Ok(None)
        }
    }
}

/// Why the earlier instance described by `meta` cannot be served by this
/// binary with `cfg`, if it cannot.
fn why_not(meta: &Meta, cfg: &Config, holders: &[Survivor]) -> Option<String> {
    let ours = our_layout();
    if meta.layout != ours {
        return Some(format!("its maps are laid out differently (theirs: {:?}; this binary: {ours:?})", meta.layout));
    }
    if meta.dataplane != "kernel" {
        return Some(format!("it ran the {} data plane", meta.dataplane));
    }
    if cfg.dataplane == DataplaneMode::Userspace {
        return Some("this configuration asks for dataplane = \"userspace\"".into());
    }
    let same =
        |f: &FrontendConfig, at: &SocketAddr| f.listen == *at || (f.listen.port() == 0 && f.listen.ip() == at.ip());
    if meta.listen.len() != cfg.frontends.len() || !cfg.frontends.iter().zip(&meta.listen).all(|(f, a)| same(f, a)) {
        let ours: Vec<SocketAddr> = cfg.frontends.iter().map(|f| f.listen).collect();
        return Some(format!("its frontends listen on {:?}; this configuration on {ours:?}", meta.listen));
    }
    if let Some(h) = holders.iter().find(|h| u32::from(h.slot) >= cfg.workers) {
        return Some(format!(
            "it has a holder for worker slot {}; this configuration has {} worker(s)",
            h.slot, cfg.workers
        ));
    }
    None
}

/// What `cfg` keeps to on the maps pinned at its `pin_path`, which an
/// earlier instance made and which keep the capacities it gave them
/// ([`crate::config::fit`]; `kernel`: they carry connections).
/// `Ok(Some(n))`: they hold `maxconn = n` at most, less than `cfg`'s.
/// `Err`: why `cfg` cannot run on them.
pub(super) fn on_pinned_maps(cfg: &Config, kernel: bool) -> Result<Option<u32>, String> {
    let have = crate::kernel::fill::capacities(&cfg.pin_path).map_err(|e| e.to_string())?;
    let shape = crate::config::memory::Shape { kernel: kernel && cfg.memory.kernel, ..cfg.memory };
    let fit = crate::config::fit::fit(shape, &have)?;
    for (map, have, want) in fit.short {
        log::warn!(
            "{map} taken over holds {have} rows, where this configuration would make {want}: rows past them are              not published (`lb stats` shows the map full) until lb is stopped and started"
        );
    }
    if fit.maxconn >= cfg.maxconn {
        return Ok(None);
    }
    log::warn!(
        "maxconn = {} instead of {}: the maps taken over hold no more (LB_CONN {}, LB_TARGET {}, LB_SPLICE {},          LB_TARGET_OK {} entries); stop and start lb to size them for this configuration",
        fit.maxconn,
        cfg.maxconn,
        have.conn,
        have.target,
        have.splice,
        have.target_ok
    );
    Ok(Some(fit.maxconn))
}

/// `cfg` (parsed from `text`) and `reload` with `maxconn` at most `cap`,
/// which the workers and reloads then parse with too.
pub(super) fn capped(cfg: Config, reload: Reload, text: &str, cap: Option<u32>) -> anyhow::Result<(Config, Reload)> {
    let Some(cap) = cap else { return Ok((cfg, reload)) };
    let overrides = Overrides { maxconn: Some(cap), ..reload.overrides };
    let cfg = Config::parse_on(&AlreadyChecked, &reload.path.display().to_string(), text, &overrides)?;
    Ok((cfg, Reload { overrides, ..reload }))
}

/// The pid of a live process holding the lock of `spec`'s slot: a holder
/// this supervisor did not start (a killed supervisor's, or a failed new
/// binary's in `lb upgrade`).
pub(super) fn holder_alive(spec: &HolderSpec) -> Option<u32> {
    match lock::holder(&spec.lock) {
        Some((true, Some(pid))) => Some(pid),
        _ => None,
    }
}

/// A holder started by [`take_holder`]: its process, pid and the
/// connections it took over, and whether it took them from the old one
/// (`false`: it started anew, the old one's connections are lost).
pub(super) type Taken = ((tokio::process::Child, u32, usize), bool);

/// Starts slot `i`'s holder taking over from `old` (another instance's
/// holder of the slot). If that fails, the old holder is stopped (its
/// connections are lost, and said so) and a holder starts anew.
pub(super) async fn take_holder(spec: &HolderSpec, old: u32) -> anyhow::Result<Taken> {
    let taking = HolderSpec { takeover: true, ..spec.clone() };
    match spawn_holder(&taking).await {
        Ok((child, pid, took)) => {
            log::info!(
                "slot {}: took over {took} spliced connection(s) from the earlier holder (pid {old})",
                spec.index
            );
            Ok(((child, pid, took), true))
        }
        Err(e) => {
            log::error!(
                "slot {}: taking over the earlier holder (pid {old}) failed: {e:#}; stopping it (its connections are \
                 closed) and starting a new one",
                spec.index
            );
            stop_holders(&[Survivor { slot: spec.index, pid: old, lock: spec.lock.clone() }]);
            Ok((spawn_holder(spec).await?, false))
        }
    }
}

/// How long stopped holders may take to close their connections.
const HOLDER_GRACE: Duration = Duration::from_secs(30);
/// How long `lb stop` waits for a supervisor (it stops its workers and
/// holders first, each with its own grace).
const SUPERVISOR_GRACE: Duration = Duration::from_secs(90);

/// SIGTERM to each holder in `holders` (each closes its connections and
/// exits), then SIGKILL to those whose lock is still held after
/// [`HOLDER_GRACE`]; returns once every lock is free.
fn stop_holders(holders: &[Survivor]) {
    for h in holders {
        h.signal(Signal::TERM);
    }
    if !wait_until(HOLDER_GRACE, || !holders.iter().any(Survivor::alive)) {
        for h in holders.iter().filter(|h| h.alive()) {
            log::warn!("holder pid {} did not stop within {HOLDER_GRACE:?}; killing it", h.pid);
            h.signal(Signal::KILL);
        }
        wait_until(Duration::from_secs(5), || !holders.iter().any(Survivor::alive));
    }
}

/// Polls `done` every 20 ms for up to `within`: whether it came true.
fn wait_until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `lb stop`: stops the lb whose pins are at `pin_path` (SIGTERM to its
/// supervisor, which stops everything, as `systemctl stop` does), then any
/// holders left by a supervisor that is gone (their connections are
/// closed), and removes pins left behind. Says what it did.
pub fn stop(run_dir: &Path, pin_path: &Path) -> anyhow::Result<String> {
    let mut did = Vec::new();
    let lock_file = run_file(run_dir, pin_path, "lock");
    if let Some((true, pid)) = lock::holder(&lock_file) {
        let pid = pid.with_context(|| format!("{} is held but names no pid", lock_file.display()))?;
        signal_holder_of(&lock_file, pid, Signal::TERM);
        let gone = wait_until(SUPERVISOR_GRACE, || !matches!(lock::holder(&lock_file), Some((true, _))));
        anyhow::ensure!(gone, "lb (pid {pid}) did not stop within {SUPERVISOR_GRACE:?}");
        did.push(format!("stopped lb (pid {pid})"));
    }
    let holders = live_holders(run_dir, pin_path);
    if !holders.is_empty() {
        let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
        stop_holders(&holders);
        did.push(format!(
            "stopped {} holder(s) left by a supervisor that is gone (pids {pids:?}); their connections are closed",
            holders.len()
        ));
    }
    if Objects::remove_stale(run_dir, pin_path)? {
        did.push(format!("removed the pins at {}", pin_path.display()));
    }
    remove_holder_files(run_dir, pin_path);
    // The control socket a killed supervisor left (at its default path).
    let socket = crate::control::default_path(run_dir, pin_path);
    let socket_lock = crate::control::lock_path(&socket);
    if matches!(lock::holder(&socket_lock), Some((false, _))) {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&socket_lock);
    }
    anyhow::ensure!(!did.is_empty(), "no lb at {}: nothing runs and nothing is pinned there", pin_path.display());
    Ok(did.join("; "))
}

/// Removes the socket, lock and heartbeat file of each slot whose holder
/// is gone without removing them (killed); a live holder's are left alone.
fn remove_holder_files(run_dir: &Path, pin_path: &Path) {
    for slot in 0..MAX_WORKERS as u16 {
        let lock = lb_common::files::holder_lock(run_dir, pin_path, slot);
        if matches!(lock::holder(&lock), Some((true, _))) {
            continue;
        }
        let _ = std::fs::remove_file(lb_common::files::holder_socket(run_dir, pin_path, slot));
        let _ = std::fs::remove_file(lb_common::files::holder_beat(run_dir, pin_path, slot));
        let _ = std::fs::remove_file(&lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, host::AlreadyChecked};

    fn cfg(extra: &str, listen: &str) -> Config {
        let text = format!(
            "{extra}\n[[frontend]]\nname = \"f\"\nlisten = \"{listen}\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n"
        );
        Config::parse_on(&AlreadyChecked, "t.toml", &text, &Overrides::default()).unwrap()
    }

    fn meta() -> Meta {
        Meta {
            dataplane: "kernel".into(),
            layout: our_layout(),
            listen: vec!["127.0.0.1:7000".parse().unwrap()],
            ..Meta::default()
        }
    }

    fn slot(slot: u16) -> Vec<Survivor> {
        vec![Survivor { slot, pid: 1, lock: PathBuf::new() }]
    }

    #[test]
    fn takes_over_only_what_this_binary_and_config_can_serve() {
        let c = cfg("", "127.0.0.1:7000");
        assert_eq!(why_not(&meta(), &c, &slot(0)), None);
        // A port chosen by the kernel (port 0) is the one the holders have.
        assert_eq!(why_not(&meta(), &cfg("", "127.0.0.1:0"), &slot(0)), None);
        let other = Meta { layout: "LB_CONN:8/8".into(), ..meta() };
        let why = why_not(&other, &c, &slot(0)).unwrap();
        assert!(why.starts_with("its maps are laid out differently (theirs: \"LB_CONN:8/8\""), "{why}");
        let user = Meta { dataplane: "userspace".into(), ..meta() };
        assert_eq!(why_not(&user, &c, &slot(0)).unwrap(), "it ran the userspace data plane");
        let why = why_not(&meta(), &cfg("dataplane = \"userspace\"", "127.0.0.1:7000"), &slot(0)).unwrap();
        assert_eq!(why, "this configuration asks for dataplane = \"userspace\"");
        let why = why_not(&meta(), &cfg("", "127.0.0.1:7001"), &slot(0)).unwrap();
        assert_eq!(why, "its frontends listen on [127.0.0.1:7000]; this configuration on [127.0.0.1:7001]");
        let why = why_not(&meta(), &cfg("workers = 2", "127.0.0.1:7000"), &slot(2)).unwrap();
        assert_eq!(why, "it has a holder for worker slot 2; this configuration has 2 worker(s)");
        assert_eq!(why_not(&meta(), &cfg("workers = 3", "127.0.0.1:7000"), &slot(2)), None);
    }
}
