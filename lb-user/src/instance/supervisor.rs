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
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{sync::mpsc, task::JoinSet};

use super::{
    Ready, Reload,
    children::{Started, Waits, WorkerIo, describe, signal, spawn_holder, spawn_worker, stop_all},
    holder::HolderSpec,
    owner::Owner,
    wait_for_signal,
    worker::WorkerSpec,
};
use crate::{
    config::Config,
    control,
    dataplane::Kind,
    proxy::accept,
    servers::{Backends, command::Command, reload::ReloadError},
};

/// A worker that dies sooner than this after its start is restarted only
/// after this long, so a crash loop does not spin.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Watches each worker's `LB_WORKERS` entry for progress: a worker whose
/// publication (every 100 ms) has not advanced for `timeouts.worker` is
/// hung (stopped, deadlocked) and is killed and restarted, since
/// `SO_REUSEPORT` keeps handing it new clients.
struct Watchdog {
    maps: crate::kernel::maps::StatMaps,
    hung_after: Duration,
    /// Per slot: the last `seq` seen and when it changed.
    seen: Vec<(u64, Instant)>,
}

impl Watchdog {
    /// Kills the workers that stopped publishing; their exit restarts them.
    fn check(&mut self, slots: &[Slot]) {
        for (i, slot) in slots.iter().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let seq = self.maps.workers.get(&(i as u32), 0).ok().filter(|w| w.pid == u64::from(pid)).map(|w| w.seq);
            let seen = &mut self.seen[i];
            match seq {
                Some(s) if s != seen.0 => *seen = (s, Instant::now()),
                _ if seen.1.elapsed().min(slot.started.elapsed()) > self.hung_after => {
                    log::warn!(
                        "worker {i} (pid {pid}): no heartbeat for {:?} (timeouts.worker): hung; killing it",
                        self.hung_after
                    );
                    signal(pid, rustix::process::Signal::KILL);
                    *seen = (0, Instant::now());
                }
                _ => {}
            }
        }
    }
}

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

/// One worker place.
struct Slot {
    io: Option<WorkerIo>,
    pid: Option<u32>,
    started: Instant,
}

/// Everything the supervisor's loop works on.
struct Supervisor {
    cfg: Config,
    reload: Reload,
    /// The spec every worker starts from (its `replay` filled at spawn).
    spec: WorkerSpec,
    model: Arc<Backends>,
    /// Operator commands applied so far (health goes as current states).
    replay: Vec<Command>,
    slots: Vec<Slot>,
    /// Each slot's holder: how to start it, and its pid while it runs.
    holders: Vec<(HolderSpec, Option<u32>)>,
}

impl Supervisor {
    /// The spec for worker `index` now: the commands so far, then the
    /// servers' current health.
    fn spec_for(&self, index: usize) -> WorkerSpec {
        let replay = self.replay.iter().cloned().chain(self.model.health_commands()).collect();
        let holder = self.holders[index].0.socket.clone();
        WorkerSpec { index: index as u16, replay, holder, ..self.spec.clone() }
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

/// Runs the instance until SIGINT or SIGTERM.
pub async fn run(cfg: Config, reload: Reload, config_text: String, announce: bool) -> anyhow::Result<()> {
    let (listen, _holders) = resolve_listeners(&cfg)?;
    let (owner, ctl) = Owner::start(&cfg, &listen).await?;
    log::info!("data plane: {}; starting {} worker(s)", owner.kind, cfg.workers);
    let spec = WorkerSpec {
        index: 0,
        config_file: reload.path.display().to_string(),
        config_text,
        workers: cfg.workers,
        kind: owner.kind,
        maps: owner.maps(),
        listen: listen.clone(),
        replay: vec![],
        supervisor: std::process::id(),
        holder: Default::default(),
    };
    let model = Arc::new(Backends::new(&cfg));
    let slots = (0..cfg.workers).map(|_| Slot { io: None, pid: None, started: Instant::now() }).collect();
    let holders = (0..cfg.workers as u16)
        .map(|index| {
            let spec = HolderSpec {
                index,
                pin_path: cfg.pin_path.clone(),
                socket: lb_common::files::holder_socket(&cfg.runtime_dir, &cfg.pin_path, index),
                listen: listen.clone(),
                kernel: owner.kind == Kind::Kernel,
                idle: cfg.timeouts.idle,
                supervisor: std::process::id(),
                takeover: false,
            };
            (spec, None)
        })
        .collect();
    let mut sup = Supervisor { cfg, reload, spec, model, replay: Vec::new(), slots, holders };
    let r = supervise(&mut sup, owner.kind, announce.then_some(owner.metrics_addr), ctl).await;
    drop(owner);
    r
}

async fn supervise(
    sup: &mut Supervisor,
    kind: Kind,
    announce: Option<Option<SocketAddr>>,
    mut ctl: mpsc::Receiver<control::Msg>,
) -> anyhow::Result<()> {
    let mut waits = Waits::new();
    let mut watchdog = match crate::kernel::maps::StatMaps::open(&sup.cfg.pin_path) {
        Ok(maps) if sup.spec.maps => Some(Watchdog {
            maps,
            hung_after: sup.cfg.timeouts.worker,
            seen: vec![(0, Instant::now()); sup.slots.len()],
        }),
        _ => None,
    };
    // A hung worker is seen within a quarter of the timeout after it.
    let mut watch_tick = tokio::time::interval((sup.cfg.timeouts.worker / 4).max(Duration::from_millis(100)));
    let mut holder_waits = Waits::new();
    for i in 0..sup.holders.len() {
        match spawn_holder(&sup.holders[i].0).await {
            Ok((mut child, pid)) => {
                sup.holders[i].1 = Some(pid);
                holder_waits.spawn(async move { (i, child.wait().await) });
            }
            Err(e) => {
                stop_all(&holder_pids(sup), &mut holder_waits).await;
                return Err(e);
            }
        }
    }
    let mut first_ready = None;
    for i in 0..sup.slots.len() {
        match spawn_worker(sup.spec_for(i)).await {
            Ok(Started { mut child, ready, io }) => {
                sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                first_ready.get_or_insert(ready);
                waits.spawn(async move { (i, child.wait().await) });
            }
            Err(e) => {
                stop_all(&worker_pids(&sup.slots), &mut waits).await;
                stop_all(&holder_pids(sup), &mut holder_waits).await;
                return Err(e);
            }
        }
    }
    let ready = first_ready.context("no workers")?;
    let pids: Vec<u32> = sup.slots.iter().filter_map(|s| s.pid).collect();
    log::info!("{} worker(s) serving: pids {pids:?}", pids.len());
    if let Some(metrics) = announce {
        let r = Ready {
            event: "ready".into(),
            pid: std::process::id(),
            dataplane: kind,
            frontends: ready.frontends,
            workers: pids,
            holders: holder_pids(sup),
            metrics,
        };
        println!("{}", serde_json::to_string(&r)?);
    }
    // One set of health checks for all workers: each flip is relayed (and logged) once.
    let (flip_tx, mut flips) = mpsc::unbounded_channel();
    crate::servers::health::start(&sup.model, Some(flip_tx));
    // Restarts run beside the loop, which keeps serving commands meanwhile.
    let mut restarts: JoinSet<(usize, usize, anyhow::Result<Started>)> = JoinSet::new();

    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing SIGHUP handler")?;
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
            _ = watch_tick.tick(), if watchdog.is_some() => {
                if let Some(w) = &mut watchdog {
                    w.check(&sup.slots);
                }
            }
            Some(c) = flips.recv() => {
                if let Err(e) = sup.relay(&c).await {
                    log::warn!("relaying a health check result: {e}");
                }
            }
            Some(m) = ctl.recv() => {
                let r = match m.req {
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
            Some(Ok((i, status))) = waits.join_next() => {
                let slot = &mut sup.slots[i];
                slot.io = None;
                let Some(pid) = slot.pid.take() else { continue };
                let why = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                log::warn!("worker {i} (pid {pid}) {why}; restarting it");
                let pause = MIN_LIFETIME.saturating_sub(slot.started.elapsed());
                let (spec, replayed) = (sup.spec_for(i), sup.replay.len());
                restarts.spawn(async move {
                    tokio::time::sleep(pause).await;
                    (i, replayed, spawn_worker(spec).await)
                });
            }
            Some(Ok((i, status))) = holder_waits.join_next() => {
                let Some(pid) = sup.holders[i].1.take() else { continue };
                let why = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                log::error!(
                    "holder {i} (pid {pid}) {why}: the connections it held are lost; restarting it \
                     (worker {i} restarts with it)"
                );
                match spawn_holder(&sup.holders[i].0).await {
                    Ok((mut child, pid)) => {
                        log::info!("holder {i} restarted as pid {pid}");
                        sup.holders[i].1 = Some(pid);
                        holder_waits.spawn(async move { (i, child.wait().await) });
                    }
                    Err(e) => {
                        log::error!("restarting holder {i} failed: {e:#}; stopping");
                        stop_all(&worker_pids(&sup.slots), &mut waits).await;
                        stop_all(&holder_pids(sup), &mut holder_waits).await;
                        return Err(e);
                    }
                }
            }
            Some(Ok((i, replayed, started))) = restarts.join_next() => match started {
                Ok(Started { mut child, ready, io }) => {
                    log::info!("worker {i} restarted as pid {}", ready.pid);
                    sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                    waits.spawn(async move { (i, child.wait().await) });
                    sup.catch_up(i, replayed).await;
                }
                Err(e) => {
                    log::error!("restarting worker {i} failed: {e:#}; stopping");
                    stop_all(&worker_pids(&sup.slots), &mut waits).await;
                    stop_all(&holder_pids(sup), &mut holder_waits).await;
                    return Err(e);
                }
            },
        }
    }
    log::info!("stopping {} worker(s)", sup.slots.iter().filter(|s| s.pid.is_some()).count());
    restarts.abort_all();
    stop_all(&worker_pids(&sup.slots), &mut waits).await;
    // Then the holders, which close the connections they keep.
    stop_all(&holder_pids(sup), &mut holder_waits).await;
    Ok(())
}

fn worker_pids(slots: &[Slot]) -> Vec<u32> {
    slots.iter().filter_map(|s| s.pid).collect()
}

fn holder_pids(sup: &Supervisor) -> Vec<u32> {
    sup.holders.iter().filter_map(|h| h.1).collect()
}
