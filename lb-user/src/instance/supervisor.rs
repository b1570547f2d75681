//! The supervisor (`lb run`): it owns the instance ([`super::owner`]), starts
//! the workers and restarts one that dies, runs the health checks once for
//! all of them, and is the one place that applies the operator's commands
//! and reloads: it checks each against its model of the server set, relays
//! it to every worker, and keeps the list to replay to a worker it starts
//! later. Each worker slot also has a holder process ([`super::holder`]),
//! started before the slot's first worker and kept while workers come and
//! go. SIGINT/SIGTERM stops the workers, then the holders (which close the
//! connections), then removes the pins.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::{
    Ready, Reload,
    children::{Slot, Started, describe, spawn_holder, spawn_worker},
    owner::Owner,
    restart::{MIN_LIFETIME, Restarts, retry_pause},
    state::{Procs, Supervisor},
    wait_for_signal,
    watchdog::Watchdog,
    worker::WorkerSpec,
};
use crate::{
    config::Config,
    control,
    proxy::accept,
    servers::{command::Command, reload::ReloadError},
};

/// Resolves each frontend's address once for all workers. Port 0 is bound
/// here (with SO_REUSEPORT, not listening, held until exit) to pick the
/// port; a fixed port is probed without SO_REUSEPORT so that a port held by
/// anyone else is an error now rather than a silently shared listener.
fn resolve_listeners(cfg: &Config) -> anyhow::Result<(Vec<SocketAddr>, Vec<socket2::Socket>)> {
    let mut addrs = Vec::new();
    let mut holders = Vec::new();
    for f in &cfg.frontends {
        let ctx = || format!("frontend \"{}\": listen {}", f.name, f.listen);
        if f.listen.port() == 0 {
            let s = socket2::Socket::new(socket2::Domain::for_address(f.listen), socket2::Type::STREAM, None)
                .with_context(ctx)?;
            s.set_reuse_address(true).with_context(ctx)?;
            s.set_reuse_port(true).with_context(ctx)?;
            s.bind(&f.listen.into()).with_context(ctx)?;
            let addr = s.local_addr().with_context(ctx)?.as_socket().context("listen address is not IP")?;
            addrs.push(addr);
            holders.push(s);
        } else {
            drop(accept::bind(f.listen, false).with_context(ctx)?);
            addrs.push(f.listen);
        }
    }
    Ok((addrs, holders))
}

impl Supervisor {
    /// The spec for worker `index` now: the commands so far, then the
    /// servers' current health.
    pub(super) fn spec_for(&self, index: usize) -> WorkerSpec {
        let holder = self.holders[index].0.socket.clone();
        WorkerSpec { index: index as u16, replay: self.replay_now(), holder, ..self.spec.clone() }
    }

    /// What a process started now must apply: the commands so far, then
    /// the servers' current health.
    pub(super) fn replay_now(&self) -> Vec<Command> {
        self.replay.iter().cloned().chain(self.model.health_commands()).collect()
    }

    /// Checks a command against the model, sends it to every running
    /// worker, then applies it to the model and the replay log.
    async fn relay(&mut self, cmd: &Command) -> control::Response {
        self.model.check(cmd)?;
        let mut failures = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(io) = &mut slot.io
                && let Err(e) = io.send(cmd).await
            {
                failures.push(format!("worker {i}: {e}"));
            }
        }
        let applied = self.model.apply(cmd)?;
        // Health is replayed as it is now (see `spec_for`), not flip by flip.
        if !matches!(cmd, Command::ServerHealth { .. }) {
            self.replay.push(cmd.clone());
        }
        if failures.is_empty() { Ok(applied) } else { Err(control::RequestError::Workers { applied, failures }) }
    }

    /// Reads the file again and relays its server changes like an
    /// operator's commands, or changes nothing.
    async fn reload(&mut self) -> Result<String, ReloadError> {
        let (new, _) = Config::load_with(&self.reload.path, &self.reload.overrides)?;
        let cmds = self.model.diff(&self.cfg, &new)?;
        for c in &cmds {
            let m = self.relay(c).await.map_err(|e| ReloadError::Relay(e.to_string()))?;
            log::info!("reload: {m}");
        }
        // The file's lists and rates, every time: they replace whatever
        // `lb guard` changed since.
        if let Some(g) = &new.guard {
            super::owner::guard::apply(&new.pin_path, g, &self.spec.listen)
                .map_err(|e| ReloadError::Relay(format!("guard: {e:#}")))?;
            log::info!("reload: guard lists and rates applied");
        }
        self.cfg = new;
        Ok(format!("reloaded {}: {} change(s)", self.reload.path.display(), cmds.len()))
    }

    /// A worker restarted while commands went on: it started from the log
    /// as it was; send it what came after, and the current health.
    async fn catch_up(&mut self, index: usize, replayed: usize) {
        let missed: Vec<Command> = self.replay[replayed.min(self.replay.len())..]
            .iter()
            .cloned()
            .chain(self.model.health_commands())
            .collect();
        if let Some(io) = &mut self.slots[index].io {
            for c in &missed {
                if let Err(e) = io.send(c).await {
                    log::warn!("worker {index} did not take {c:?} after its restart: {e}");
                }
            }
        }
    }
}

/// Runs the instance until SIGINT or SIGTERM, or until an upgrade hands it
/// to a new binary. Takes over the holders of an earlier instance at the
/// same pin path whose supervisor died, if there are any ([`super::adopt`]).
pub async fn run(cfg: Config, reload: Reload, config_text: String, announce: bool) -> anyhow::Result<()> {
    let (objects, earlier) = super::adopt::look(&cfg)?.unzip();
    let (cfg, reload) = super::adopt::capped(cfg, reload, &config_text, earlier.as_ref().and_then(|e| e.maxconn))?;
    let (listen, _holders) = match &earlier {
        // The earlier holders listen there already.
        Some(e) => (e.meta.listen.clone(), Vec::new()),
        None => resolve_listeners(&cfg)?,
    };
    let (mut owner, ctl) = Owner::start(&cfg, &listen, objects).await?;
    log::info!("data plane: {}; starting {} worker(s)", owner.kind, cfg.workers);
    let kind = owner.kind;
    let mut sup = Supervisor::new(cfg, reload, config_text, kind, owner.maps(), listen);
    let mut procs = Procs::default();
    let ready = match start_slots(&mut sup, &mut procs, earlier.as_ref()).await {
        Ok(r) => r,
        Err(e) => {
            procs.stop().await;
            return Err(e);
        }
    };
    let pids: Vec<u32> = sup.slots.iter().filter_map(|s| s.pid).collect();
    log::info!("{} worker(s) serving: pids {pids:?}", pids.len());
    if announce {
        let r = Ready {
            event: "ready".into(),
            pid: std::process::id(),
            dataplane: kind,
            frontends: ready.frontends,
            workers: pids,
            holders: holder_pids(&sup),
            metrics: owner.metrics_addr,
        };
        if let Err(e) = super::write_line(&serde_json::to_string(&r)?) {
            log::warn!("writing the ready line to stdout: {e}");
        }
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("telling systemd the instance is ready: {e}");
    }
    let r = serve(&mut sup, &mut procs, &mut owner, ctl).await;
    drop(owner);
    r
}

/// Starts every slot's holder (taking over the `earlier` instance's holder
/// of the slot, if it lives), then its worker; the first worker's ready line.
async fn start_slots(
    sup: &mut Supervisor,
    procs: &mut Procs,
    earlier: Option<&super::adopt::Earlier>,
) -> anyhow::Result<Ready> {
    for i in 0..sup.holders.len() {
        let (child, pid, _) = match earlier.and_then(|e| e.holder_of(i)) {
            Some(old) => super::adopt::take_holder(&sup.holders[i].0, old).await?.0,
            None => spawn_holder(&sup.holders[i].0).await?,
        };
        sup.holders[i].1 = Some(pid);
        procs.watch_holder(i, child);
    }
    let mut first_ready = None;
    for i in 0..sup.slots.len() {
        let Started { child, ready, io } = spawn_worker(sup.spec_for(i)).await?;
        sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
        first_ready.get_or_insert(ready);
        procs.watch_worker(i, child);
    }
    first_ready.context("no workers")
}

/// The supervisor's loop: signals, commands, health, restarts. Returns
/// when the instance stops (every child stopped) or has been handed to a
/// new binary (its children gone with the hand-over).
pub(super) async fn serve(
    sup: &mut Supervisor,
    procs: &mut Procs,
    owner: &mut Owner,
    mut ctl: mpsc::Receiver<control::Msg>,
) -> anyhow::Result<()> {
    // Workers beat in the pinned maps (if any), holders in a file each.
    let maps = crate::kernel::maps::StatMaps::open(&sup.cfg.pin_path).ok().filter(|_| sup.spec.maps);
    let mut watchdog = Watchdog::new(maps, sup.cfg.timeouts.worker, sup.slots.len());
    // A hung worker is seen within a quarter of the timeout after it.
    let mut watch_tick = tokio::time::interval((sup.cfg.timeouts.worker / 4).max(Duration::from_millis(100)));
    // One set of health checks for all workers: each flip is relayed (and logged) once.
    let (flip_tx, mut flips) = mpsc::unbounded_channel();
    crate::servers::health::start(&sup.model, Some(flip_tx));
    // Restarts run beside the loop, which keeps serving commands meanwhile;
    // one that fails is tried again, after a pause that grows.
    let mut restarts = Restarts::default();

    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        .context("installing SIGUSR2 handler")?;
    loop {
        tokio::select! {
            r = &mut signal => {
                r?;
                break;
            }
            _ = hup.recv() => {
                log::info!("SIGHUP received: reloading");
                match sup.reload().await {
                    Ok(m) => log::info!("{m}"),
                    Err(e) => log::error!("{e}"),
                }
            }
            _ = usr2.recv() => {
                log::info!("SIGUSR2 received: upgrading to this executable's path");
                match super::upgrade::hand_over(sup, procs, owner, None).await {
                    Ok(m) => {
                        log::info!("{m}");
                        return Ok(());
                    }
                    Err(e) => log::error!("upgrade failed: {e}"),
                }
            }
            _ = watch_tick.tick() => {
                watchdog.check(&sup.slots, &procs.workers);
                watchdog.check_holders(&sup.holders, &procs.holders);
            }
            Some(c) = flips.recv() => {
                if let Err(e) = sup.relay(&c).await {
                    log::warn!("relaying a health check result: {e}");
                }
            }
            Some(m) = ctl.recv() => {
                let r = match m.req {
                    control::Request::Upgrade { upgrade } => {
                        match super::upgrade::hand_over(sup, procs, owner, upgrade.binary).await {
                            Ok(msg) => {
                                log::info!("{msg}");
                                let _ = m.reply.send(Ok(msg));
                                // Let the session write the answer before this process ends.
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                return Ok(());
                            }
                            Err(e) => Err(control::RequestError::Upgrade(e)),
                        }
                    }
                    control::Request::Apply(c) => sup.relay(&c).await,
                    control::Request::Other { cmd: control::Other::Reload } => sup.reload().await.map_err(Into::into),
                    control::Request::Guard { cmd } => {
                        super::owner::guard::command(&sup.cfg.pin_path, sup.cfg.guard.is_some(), &cmd)
                            .map_err(control::RequestError::Guard)
                    }
                };
                match &r {
                    Ok(msg) => log::info!("{msg}"),
                    Err(e) => log::warn!("control request refused: {e}"),
                }
                let _ = m.reply.send(r);
            }
            Some(Ok((i, status))) = procs.workers.join_next() => {
                let slot = &mut sup.slots[i];
                slot.io = None;
                let Some(pid) = slot.pid.take() else { continue };
                let why = describe(&status);
                log::warn!("worker {i} (pid {pid}) {why}; restarting it");
                let pause = MIN_LIFETIME.saturating_sub(slot.started.elapsed());
                restarts.worker(i, sup.spec_for(i), sup.replay.len(), pause, 0);
            }
            Some(Ok((i, status))) = procs.holders.join_next() => {
                let Some(pid) = sup.holders[i].1.take() else { continue };
                let why = describe(&status);
                log::error!(
                    "holder {i} (pid {pid}) {why}: the connections it held are lost; restarting it \
                     (worker {i} restarts with it)"
                );
                restarts.holder(i, sup.holders[i].0.clone(), Duration::ZERO, 0);
            }
            Some(Ok((i, failures, started))) = restarts.holders.join_next() => match started {
                Ok((child, pid)) => {
                    log::info!("holder {i} restarted as pid {pid}");
                    sup.holders[i].1 = Some(pid);
                    procs.watch_holder(i, child);
                }
                Err(e) => {
                    // The other slots serve on; this one's worker waits for its holder.
                    let (failures, pause) = (failures + 1, retry_pause(failures + 1));
                    log::error!(
                        "restarting holder {i} failed ({failures} time(s) in a row): {e:#}; trying again in {pause:?}"
                    );
                    restarts.holder(i, sup.holders[i].0.clone(), pause, failures);
                }
            },
            Some(Ok((i, replayed, failures, started))) = restarts.workers.join_next() => match started {
                Ok(Started { child, ready, io }) => {
                    log::info!("worker {i} restarted as pid {}", ready.pid);
                    sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                    procs.watch_worker(i, child);
                    sup.catch_up(i, replayed).await;
                }
                Err(e) => {
                    // The other slots serve on; this one's clients wait in its listen backlog.
                    let (failures, pause) = (failures + 1, retry_pause(failures + 1));
                    log::error!(
                        "restarting worker {i} failed ({failures} time(s) in a row): {e:#}; trying again in {pause:?}"
                    );
                    restarts.worker(i, sup.spec_for(i), sup.replay.len(), pause, failures);
                }
            },
        }
    }
    log::info!("stopping {} worker(s)", sup.slots.iter().filter(|s| s.pid.is_some()).count());
    restarts.workers.abort_all();
    restarts.holders.abort_all();
    procs.stop().await;
    Ok(())
}

pub(super) fn holder_pids(sup: &Supervisor) -> Vec<u32> {
    sup.holders.iter().filter_map(|h| h.1).collect()
}
