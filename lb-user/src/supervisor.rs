//! `workers = N`: one supervisor process owns the eBPF object and the pins
//! and runs N worker processes. Each worker binds the frontends with
//! `SO_REUSEPORT` (the kernel spreads new clients over them), opens the
//! pinned maps and serves on its own. A worker that dies is restarted;
//! SIGINT/SIGTERM stops them all.

use std::{
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    config::{Config, Overrides},
    control::{self, Reply},
    dataplane::Kind,
    proxy::{self, Ready, Reload, Serve},
    runtime::{Backends, Command, ReloadError},
};

/// What a worker gets on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: u16,
    pub config_file: String,
    /// The exact text the supervisor validated (the file may change later).
    pub config_text: String,
    pub workers: u32,
    pub kind: Kind,
    /// Whether the pinned maps exist.
    pub maps: bool,
    /// Concrete listen address of each frontend, in config order.
    pub listen: Vec<SocketAddr>,
    /// Runtime commands applied so far, for a worker started later.
    pub replay: Vec<Command>,
}

/// The pipes to a worker: commands down stdin, one reply line each up stdout.
struct WorkerIo {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// How long a worker may take to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A worker that dies sooner than this after its start is restarted only
/// after this long, so a crash loop does not spin.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// How long a stopping worker may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a worker may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
            drop(proxy::bind(f.listen, false).with_context(ctx)?);
            addrs.push(f.listen);
        }
    }
    Ok((addrs, holders))
}

struct Running {
    pid: u32,
    started: Instant,
}

/// Starts worker `index` and waits for its ready line.
async fn spawn_worker(spec: &WorkerSpec) -> anyhow::Result<(Child, Ready, WorkerIo)> {
    let exe = std::env::current_exe().context("finding the lb executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.env("LB_LOG_TAG", format!("worker-{}", spec.index));
    // Own process group: a terminal's Ctrl-C reaches only the supervisor,
    // which then stops the workers in order.
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; it makes the worker exit with its supervisor.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn().context("starting a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let mut line = serde_json::to_vec(spec)?;
    line.push(b'\n');
    stdin.write_all(&line).await.context("sending the worker its spec")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let read = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
    match read {
        Ok(Ok(Some(line))) => {
            let ready: Ready = serde_json::from_str(line.trim()).context("reading the worker's ready line")?;
            Ok((child, ready, WorkerIo { stdin, lines }))
        }
        _ => {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            bail!("worker {} did not start (exit: {status:?}); see its messages above", spec.index)
        }
    }
}

/// Runs the supervisor until SIGINT or SIGTERM.
pub async fn run(cfg: Config, reload: Reload, config_text: String, announce: bool) -> anyhow::Result<()> {
    let (listen, _holders) = resolve_listeners(&cfg)?;
    let (owner, ctl) = proxy::Owner::start(&cfg).await?;
    log::info!("data plane: {}; starting {} workers", owner.kind, cfg.workers);
    let announce = announce.then_some(owner.metrics_addr);
    let r = supervise(cfg, reload, config_text, owner.kind, owner.maps(), listen, announce, ctl).await;
    drop(owner);
    r
}

/// Checks a command against the model, sends it to every running worker,
/// then applies it to the model and the replay log.
async fn relay(
    cmd: &Command,
    model: &Backends,
    io: &mut [Option<WorkerIo>],
    specs: &mut [WorkerSpec],
) -> control::Response {
    model.check(cmd)?;
    let mut errors = Vec::new();
    for (i, w) in io.iter_mut().enumerate() {
        if let Some(w) = w
            && let Err(e) = w.send(cmd).await
        {
            errors.push(format!("worker {i}: {e}"));
        }
    }
    let msg = model.apply(cmd)?;
    // Health is replayed as it is now (see `spawn_spec`), not flip by flip.
    if !matches!(cmd, Command::ServerHealth { .. }) {
        for s in specs.iter_mut() {
            s.replay.push(cmd.clone());
        }
    }
    if errors.is_empty() { Ok(msg) } else { Err(control::RequestError::Workers { applied: msg, failures: errors }) }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    mut cfg: Config,
    reload: Reload,
    config_text: String,
    kind: Kind,
    maps: bool,
    listen: Vec<SocketAddr>,
    announce: Option<Option<SocketAddr>>,
    mut ctl: mpsc::Receiver<control::Msg>,
) -> anyhow::Result<()> {
    let config_file = reload.path.display().to_string();
    let model = Arc::new(Backends::new(&cfg));
    let mut specs: Vec<WorkerSpec> = (0..cfg.workers)
        .map(|i| WorkerSpec {
            index: i as u16,
            config_file: config_file.clone(),
            config_text: config_text.clone(),
            workers: cfg.workers,
            kind,
            maps,
            listen: listen.clone(),
            replay: vec![],
        })
        .collect();
    let mut io: Vec<Option<WorkerIo>> = (0..specs.len()).map(|_| None).collect();
    let mut running: Vec<Option<Running>> = (0..specs.len()).map(|_| None).collect();
    let mut waits: JoinSet<(usize, std::io::Result<ExitStatus>)> = JoinSet::new();
    let mut first_ready = None;
    for (i, spec) in specs.iter().enumerate() {
        match spawn_worker(spec).await {
            Ok((mut child, ready, wio)) => {
                running[i] = Some(Running { pid: ready.pid, started: Instant::now() });
                io[i] = Some(wio);
                first_ready.get_or_insert(ready);
                waits.spawn(async move { (i, child.wait().await) });
            }
            Err(e) => {
                stop_all(&running, &mut waits).await;
                return Err(e);
            }
        }
    }
    let ready = first_ready.context("no workers")?;
    log::info!(
        "{} workers serving: pids {:?}",
        specs.len(),
        running.iter().flatten().map(|r| r.pid).collect::<Vec<_>>()
    );
    if let Some(metrics) = announce {
        let r = Ready {
            event: "ready".into(),
            pid: std::process::id(),
            dataplane: kind,
            frontends: ready.frontends,
            workers: running.iter().flatten().map(|r| r.pid).collect(),
            metrics,
        };
        println!("{}", serde_json::to_string(&r)?);
    }

    // One set of health checks for all workers: each flip is relayed (and logged) once.
    let (flip_tx, mut flips) = mpsc::unbounded_channel();
    crate::health::start(&model, Some(flip_tx));

    let signal = proxy::wait_for_signal();
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
                match reload_all(&reload, &mut cfg, &model, &mut io, &mut specs).await {
                    Ok(m) => log::info!("{m}"),
                    Err(e) => log::error!("{e}"),
                }
            }
            Some(c) = flips.recv() => {
                if let Err(e) = relay(&c, &model, &mut io, &mut specs).await {
                    log::warn!("relaying a health check result: {e}");
                }
            }
            Some(m) = ctl.recv() => {
                let r = match m.req {
                    control::Request::Apply(c) => relay(&c, &model, &mut io, &mut specs).await,
                    control::Request::Other { cmd: control::Other::Reload } => {
                        reload_all(&reload, &mut cfg, &model, &mut io, &mut specs).await.map_err(Into::into)
                    }
                };
                match &r {
                    Ok(msg) => log::info!("{msg}"),
                    Err(e) => log::warn!("control request refused: {e}"),
                }
                let _ = m.reply.send(r);
            }
            Some(Ok((i, status))) = waits.join_next() => {
                io[i] = None;
                let Some(prev) = running[i].take() else { continue };
                let why = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                log::warn!("worker {i} (pid {}) {why}; restarting it", prev.pid);
                if prev.started.elapsed() < MIN_LIFETIME {
                    tokio::time::sleep(MIN_LIFETIME).await;
                }
                match spawn_worker(&spawn_spec(&specs[i], &model)).await {
                    Ok((mut child, ready, wio)) => {
                        log::info!("worker {i} restarted as pid {}", ready.pid);
                        running[i] = Some(Running { pid: ready.pid, started: Instant::now() });
                        io[i] = Some(wio);
                        waits.spawn(async move { (i, child.wait().await) });
                    }
                    Err(e) => {
                        log::error!("restarting worker {i} failed: {e:#}; stopping");
                        stop_all(&running, &mut waits).await;
                        return Err(e);
                    }
                }
            }
        }
    }
    log::info!("stopping {} workers", running.iter().flatten().count());
    stop_all(&running, &mut waits).await;
    specs.clear();
    Ok(())
}

/// `spec` with the servers' current health appended to its replay.
fn spawn_spec(spec: &WorkerSpec, model: &Backends) -> WorkerSpec {
    WorkerSpec { replay: spec.replay.iter().cloned().chain(model.health_commands()).collect(), ..spec.clone() }
}

/// Reload for all workers: every change is relayed like an operator's command.
async fn reload_all(
    src: &Reload,
    current: &mut Config,
    model: &Backends,
    io: &mut [Option<WorkerIo>],
    specs: &mut [WorkerSpec],
) -> Result<String, ReloadError> {
    let (new, cmds) = proxy::plan_reload(src, current, model)?;
    for c in &cmds {
        let m = relay(c, model, io, specs).await.map_err(|e| ReloadError::Relay(e.to_string()))?;
        log::info!("reload: {m}");
    }
    *current = new;
    Ok(format!("reloaded {}: {} change(s)", src.path.display(), cmds.len()))
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(sig)) => format!("was killed by signal {sig}{}", if s.core_dumped() { " (core dumped)" } else { "" }),
        _ => "ended".into(),
    }
}

async fn stop_all(running: &[Option<Running>], waits: &mut JoinSet<(usize, std::io::Result<ExitStatus>)>) {
    for r in running.iter().flatten() {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(r.pid as i32, libc::SIGTERM) };
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !waits.is_empty() {
        match tokio::time::timeout_at(deadline, waits.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                for r in running.iter().flatten() {
                    log::warn!("worker pid {} did not stop within {STOP_GRACE:?}; killing it", r.pid);
                    // SAFETY: as above.
                    unsafe { libc::kill(r.pid as i32, libc::SIGKILL) };
                }
                while waits.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// `lb worker`: reads a [`WorkerSpec`] (first line of stdin) and serves;
/// later lines are commands from the supervisor, each answered on stdout.
pub async fn worker() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await.context("reading the spec")?.context("no spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("the worker spec on stdin is not valid")?;
    let o = Overrides { workers: Some(spec.workers), dataplane: None };
    let mut cfg = Config::parse_with(&spec.config_file, &spec.config_text, &o)?;
    if cfg.frontends.len() != spec.listen.len() {
        bail!("the worker spec lists {} listen addresses for {} frontends", spec.listen.len(), cfg.frontends.len());
    }
    for (f, a) in cfg.frontends.iter_mut().zip(&spec.listen) {
        f.listen = *a;
    }
    let listeners = proxy::bind_all(&cfg.frontends, true)?;
    let (tx, ctl) = mpsc::channel(16);
    // Commands arrive only after the ready line, so answers never precede it.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let r: control::Response = match serde_json::from_str::<Command>(&line) {
                Err(e) => Err(control::RequestError::BadRequest(e.to_string())),
                Ok(c) => {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    if tx.send(control::Msg { req: control::Request::Apply(c), reply }).await.is_err() {
                        return;
                    }
                    rx.await.unwrap_or(Err(control::RequestError::Stopping))
                }
            };
            println!("{}", serde_json::to_string(&Reply::from(r)).unwrap_or_default());
        }
    });
    let serve =
        Serve { cfg, kind: spec.kind, maps: spec.maps, worker: spec.index, replay: spec.replay, ctl, reload: None };
    proxy::serve(serve, listeners, |ready| {
        println!("{}", serde_json::to_string(&ready).unwrap_or_default());
    })
    .await
}
