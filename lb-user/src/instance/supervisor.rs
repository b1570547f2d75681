//! The supervisor (`lb run`): it owns the instance ([`super::owner`]), starts
//! the workers and restarts one that dies, runs the health checks once for
//! all of them, and is the one place that applies the operator's commands
//! and reloads: it checks each against its model of the server set, relays
//! it to every worker, and keeps the list to replay to a worker it starts
//! later. SIGINT/SIGTERM stops the workers, then removes the pins.

use std::{
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
    sync::mpsc,
    task::JoinSet,
};

use super::{Ready, Reload, owner::Owner, wait_for_signal, worker::WorkerSpec};
use crate::{
    config::Config,
    control::{self, Reply},
    dataplane::Kind,
    proxy::accept,
    servers::{Backends, command::Command, reload::ReloadError},
};

/// The pipes to a worker: commands down stdin, one reply line each up stdout.
struct WorkerIo {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// How long a worker may take to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker that dies sooner than this after its start is restarted only
/// after this long, so a crash loop does not spin.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// How long a stopping worker may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a worker may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);
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

impl WorkerIo {
    async fn send(&mut self, cmd: &Command) -> Result<String, String> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stdin.write_all(&line).await.map_err(|e| format!("sending: {e}"))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => {
                let r: Reply = serde_json::from_str(&l).map_err(|e| format!("bad reply {l:?}: {e}"))?;
                if r.ok { Ok(r.message) } else { Err(r.message) }
            }
            Ok(Ok(None)) => Err("exited".into()),
            Ok(Err(e)) => Err(format!("reading: {e}")),
            Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
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

/// A worker started and ready to serve.
struct Started {
    child: Child,
    ready: Ready,
    io: WorkerIo,
}

/// Starts a worker and waits for its ready line.
async fn spawn_worker(spec: WorkerSpec) -> anyhow::Result<Started> {
    let exe = std::env::current_exe().context("finding the lb executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.env("LB_LOG_TAG", format!("worker-{}", spec.index));
    // Own process group: a terminal's Ctrl-C reaches only the supervisor,
    // which then stops the workers in order.
    cmd.process_group(0);
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn().context("starting a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let mut line = serde_json::to_vec(&spec)?;
    line.push(b'\n');
    stdin.write_all(&line).await.context("sending the worker its spec")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) => {
            let ready: Ready = serde_json::from_str(line.trim()).context("reading the worker's ready line")?;
            Ok(Started { child, ready, io: WorkerIo { stdin, lines } })
        }
        _ => {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            bail!("worker {} did not start (exit: {status:?}); see its messages above", spec.index)
        }
    }
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
}

impl Supervisor {
    /// The spec for worker `index` now: the commands so far, then the
    /// servers' current health.
    fn spec_for(&self, index: usize) -> WorkerSpec {
        let replay = self.replay.iter().cloned().chain(self.model.health_commands()).collect();
        WorkerSpec { index: index as u16, replay, ..self.spec.clone() }
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
        listen,
        replay: vec![],
        supervisor: std::process::id(),
    };
    let model = Arc::new(Backends::new(&cfg));
    let slots = (0..cfg.workers).map(|_| Slot { io: None, pid: None, started: Instant::now() }).collect();
    let mut sup = Supervisor { cfg, reload, spec, model, replay: Vec::new(), slots };
    let r = supervise(&mut sup, owner.kind, announce.then_some(owner.metrics_addr), ctl).await;
    drop(owner);
    r
}

type Waits = JoinSet<(usize, std::io::Result<ExitStatus>)>;

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
    let mut first_ready = None;
    for i in 0..sup.slots.len() {
        match spawn_worker(sup.spec_for(i)).await {
            Ok(Started { mut child, ready, io }) => {
                sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                first_ready.get_or_insert(ready);
                waits.spawn(async move { (i, child.wait().await) });
            }
            Err(e) => {
                stop_all(&sup.slots, &mut waits).await;
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
            Some(Ok((i, replayed, started))) = restarts.join_next() => match started {
                Ok(Started { mut child, ready, io }) => {
                    log::info!("worker {i} restarted as pid {}", ready.pid);
                    sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                    waits.spawn(async move { (i, child.wait().await) });
                    sup.catch_up(i, replayed).await;
                }
                Err(e) => {
                    log::error!("restarting worker {i} failed: {e:#}; stopping");
                    stop_all(&sup.slots, &mut waits).await;
                    return Err(e);
                }
            },
        }
    }
    log::info!("stopping {} worker(s)", sup.slots.iter().filter(|s| s.pid.is_some()).count());
    restarts.abort_all();
    stop_all(&sup.slots, &mut waits).await;
    Ok(())
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(sig)) => format!("was killed by signal {sig}{}", if s.core_dumped() { " (core dumped)" } else { "" }),
        _ => "ended".into(),
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

async fn stop_all(slots: &[Slot], waits: &mut Waits) {
    let pids: Vec<u32> = slots.iter().filter_map(|s| s.pid).collect();
    for &pid in &pids {
        signal(pid, rustix::process::Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !waits.is_empty() {
        match tokio::time::timeout_at(deadline, waits.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                for &pid in &pids {
                    log::warn!("worker pid {pid} did not stop within {STOP_GRACE:?}; killing it");
                    signal(pid, rustix::process::Signal::KILL);
                }
                while waits.join_next().await.is_some() {}
                break;
            }
        }
    }
}
