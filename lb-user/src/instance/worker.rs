//! A worker process (`lb worker`, started by the supervisor): it takes its
//! slot's frontend sockets from the slot's holder (bound there with
//! `SO_REUSEPORT`: the kernel spreads clients over the slots), counts the
//! connections the holder already keeps, opens the pinned maps, and serves
//! until SIGTERM, applying the commands its supervisor sends on stdin (one
//! JSON line each, answered with one line on stdout). Spliced connections
//! go to the holder and outlive the worker.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use super::{Ready, ReadyFrontend, raise_fd_limit, wait_for_signal};
use crate::{
    config::{Config, Overrides, host::AlreadyChecked},
    control::{self, Reply},
    dataplane::{
        self, Kind,
        holder::{
            link::{Link, Welcome},
            wire::Held,
        },
    },
    kernel::{maps::StatMaps, sys},
    observe::{conn::ConnGuard, counters::Counters, publish::Publisher},
    proxy::{Shared, accept},
    servers::{Backends, command::Command},
};

/// What a worker gets on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: u16,
    pub config_file: String,
    /// The exact text the supervisor validated (the file may change later).
    pub config_text: String,
    pub workers: u32,
    /// [`Overrides::maxconn`] of the supervisor (maps taken over).
    #[serde(default)]
    pub maxconn: Option<u32>,
    pub kind: Kind,
    /// Whether the pinned maps exist.
    pub maps: bool,
    /// Concrete listen address of each frontend, in config order (the
    /// supervisor's record; the worker takes the bound sockets from its holder).
    pub listen: Vec<SocketAddr>,
    /// Runtime commands applied so far, for a worker started later.
    pub replay: Vec<Command>,
    /// The supervisor's pid: the worker exits if that process goes.
    pub supervisor: u32,
    /// The socket of the slot's holder.
    pub holder: PathBuf,
}

/// A command from the supervisor: one line of the worker's stdin.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommandLine {
    /// Echoed in the reply, so an answer that comes after the supervisor
    /// gave up waiting is never taken for the answer to a later command.
    pub id: u64,
    #[serde(flatten)]
    pub cmd: Command,
}

/// The worker's answer: one line of its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplyLine {
    /// The command's.
    pub id: u64,
    #[serde(flatten)]
    pub reply: Reply,
}

/// How long a worker waits for its slot's holder (restarted beside it).
const HOLDER_WAIT: Duration = Duration::from_secs(10);
/// `oom_score_adj` of a worker: above its holder's, so the OOM killer takes
/// the worker first.
const WORKER_OOM_SCORE_ADJ: &str = "500";
/// How long a stopping worker lets clients it accepted finish their setup.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);

/// `lb worker`: reads a [`WorkerSpec`] (first line of stdin) and serves.
pub async fn run() -> anyhow::Result<()> {
    let (spec, mut lines) = super::child_spec("worker", |s: &WorkerSpec| s.supervisor, |_| false).await?;
    super::refused_by_test("worker", spec.index)?;
    // Under memory pressure the kernel should pick a worker (restarted,
    // nothing lost) before a holder (its connections go with it). Raising
    // one's own score needs no privilege.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", WORKER_OOM_SCORE_ADJ) {
        log::warn!("raising this worker's oom_score_adj: {e}");
    }
    let o = Overrides { workers: Some(spec.workers), dataplane: None, maxconn: spec.maxconn };
    let cfg = Config::parse_on(&AlreadyChecked, &spec.config_file, &spec.config_text, &o)?;
    let (link, welcome) = Link::connect(&spec.holder, HOLDER_WAIT)?;
    if welcome.listeners.len() != cfg.frontends.len() {
        bail!("the holder has {} listeners for {} frontends", welcome.listeners.len(), cfg.frontends.len());
    }
    let (tx, ctl) = mpsc::channel(16);
    // Commands arrive only after the ready line, so answers never precede it.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let (id, r): (u64, control::Response) = match serde_json::from_str::<CommandLine>(&line) {
                Err(e) => {
                    let id = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["id"].as_u64());
                    (id.unwrap_or(0), Err(control::RequestError::BadRequest(e.to_string())))
                }
                Ok(CommandLine { id, cmd }) => {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    if tx.send(control::Msg { req: control::Request::Apply(cmd), reply }).await.is_err() {
                        return;
                    }
                    (id, rx.await.unwrap_or(Err(control::RequestError::Stopping)))
                }
            };
            let line = serde_json::to_string(&ReplyLine { id, reply: Reply::from(r) }).unwrap_or_default();
            if let Err(e) = super::write_line(&line) {
                log::warn!("answering the supervisor: {e}; no more commands are taken");
                return;
            }
        }
    });
    serve(cfg, &spec, Arc::new(link), welcome, ctl).await
}

/// Counts the connections the holder kept from an earlier worker of the
/// slot, as if this one had made them.
fn adopt(live: Vec<Held>, link: &Link, shared: &Shared, permits: &[Option<Arc<Semaphore>>], global: &Arc<Semaphore>) {
    let now = sys::monotonic_coarse_ns();
    let n = live.len();
    // Removed servers that still have connections count too; listed once.
    let retiring = shared.backends.retiring_servers();
    for h in live {
        let server = shared.backends.list.get(usize::from(h.backend)).and_then(|b| {
            let s = b.servers().iter().chain(&retiring).find(|s| s.cfg.addr.0 == h.server)?.clone();
            // Without a pool the one pair has no source address.
            let p = s.pairs.iter().find(|p| p.source.is_none_or(|ip| ip == h.source.ip()))?.clone();
            Some((s, p))
        });
        let own = permits.get(usize::from(h.frontend)).cloned().flatten().and_then(|f| f.try_acquire_owned().ok());
        let permits = [own, global.clone().try_acquire_owned().ok()];
        let age = Duration::from_nanos(now.saturating_sub(h.start_ns));
        let mut guard = ConnGuard::adopted(shared.stats.clone(), permits, h.client, shared.access_log, age, server);
        guard.kernel_counted([!h.client_copied, true]);
        if h.packet.is_some() {
            guard.joined(h.source.port(), || {});
        }
        link.adopt(h.id, guard);
    }
    if n > 0 {
        log::info!("took over {n} spliced connection(s) from the slot's holder");
    }
}

/// Serves `listeners` until SIGINT or SIGTERM, applying the commands that
/// arrive on `ctl`; then stops accepting, closes every connection and
/// stops the data plane.
async fn serve(
    cfg: Config,
    spec: &WorkerSpec,
    link: Arc<Link>,
    welcome: Welcome,
    mut ctl: mpsc::Receiver<control::Msg>,
) -> anyhow::Result<()> {
    let per_worker = cfg.maxconn_per_worker();
    // On the packet plane alone only connections being set up or kept on
    // sockmap hold descriptors: no share to warn about.
    raise_fd_limit(if spec.kind == Kind::Kernel && cfg.packet_only() { 0 } else { per_worker });
    let stats = Arc::new(Counters::default());
    let dataplane = dataplane::open(
        spec.kind,
        &cfg.pin_path,
        stats.clone(),
        cfg.timeouts.idle,
        cfg.splice_queue_limit,
        spec.index,
        link.clone(),
        cfg.frontends.iter().map(|f| f.splice == crate::config::Splice::Packet).collect(),
    )?;
    let backends = Arc::new(Backends::new(&cfg));
    for c in &spec.replay {
        if let Err(e) = backends.apply(c) {
            log::warn!("replaying {c:?}: {e}");
        }
    }
    let publisher = if spec.maps {
        let m = StatMaps::open(&cfg.pin_path)
            .map_err(|e| anyhow::anyhow!("opening the stats maps at {}: {e}", cfg.pin_path.display()))?;
        Some(Arc::new(Mutex::new(Publisher::new(m, spec.index, backends.clone(), stats.clone()))))
    } else {
        None
    };
    let publish_task = publisher.clone().map(|p| tokio::spawn(Publisher::run(p)));
    let shared = Arc::new(Shared {
        access_log: cfg.access_log,
        backends,
        dataplane: dataplane.clone(),
        stats: stats.clone(),
        connect_timeout: cfg.timeouts.connect,
        queue_timeout: cfg.timeouts.queue,
        connect_attempts: cfg.connect_attempts,
        send_buffer: cfg.send_buffer,
        sequential_ports: crate::kernel::sys::has_local_port_range(),
        own_ports: (spec.kind == dataplane::Kind::Kernel && cfg.packet_plane()).then(|| {
            let system = lb_common::host::ephemeral_range().unwrap_or((32768, 60999));
            crate::proxy::connect::PortShare { worker: spec.index, workers: cfg.workers as u16, system }
        }),
        in_flight: Default::default(),
    });
    let global = Arc::new(Semaphore::new(per_worker as usize));
    let own: Vec<Option<Arc<Semaphore>>> = cfg
        .frontends
        .iter()
        .map(|f| f.maxconn.map(|m| Arc::new(Semaphore::new(m.div_ceil(cfg.workers) as usize))))
        .collect();
    adopt(welcome.live, &link, &shared, &own, &global);
    std::thread::Builder::new().name("lb-holder-link".into()).spawn(move || link.run())?;
    let mut ready = Ready {
        event: "ready".into(),
        pid: std::process::id(),
        dataplane: spec.kind,
        frontends: vec![],
        workers: vec![],
        holders: vec![],
        metrics: None,
    };
    let mut accepts = JoinSet::new();
    for (i, (f, l)) in cfg.frontends.iter().zip(welcome.listeners).enumerate() {
        l.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from their listener: one
        // syscall per worker instead of one per client. Set here, not only
        // at bind, so listeners taken over from an older binary get it too.
        socket2::SockRef::from(&l).set_tcp_nodelay(true)?;
        // Their send buffer too (`send_buffer`).
        crate::kernel::sys::set_send_buffer(&l, cfg.send_buffer);
        if f.splice == crate::config::Splice::Packet && spec.kind == dataplane::Kind::Kernel {
            // Clients keep their SYN, where `lb_setup` reads the MSS each
            // announced (the packet plane joins only what fits).
            crate::kernel::sys::set_save_syn(&l)?;
        }
        let addr = l.local_addr()?;
        let l = crate::kernel::sys::async_listener(l)?;
        log::info!(
            "frontend \"{}\" listening on {addr} -> backend \"{}\"",
            f.name,
            shared.backends.list[f.backend].name
        );
        ready.frontends.push(ReadyFrontend { name: f.name.clone(), listen: addr });
        let route = Arc::new(accept::Route::of(i, f, cfg.timeouts.client_hello));
        accepts.spawn(accept::accept_loop(l, route, global.clone(), own[i].clone(), shared.clone()));
    }
    super::write_line(&serde_json::to_string(&ready).unwrap_or_default())
        .context("telling the supervisor this worker is ready")?;

    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => {
                r?;
                break;
            }
            Some(m) = ctl.recv() => {
                let r: control::Response = match m.req {
                    control::Request::Apply(c) => shared.backends.apply(&c).map_err(Into::into),
                    control::Request::Other { cmd: control::Other::Reload } => {
                        Err(crate::servers::reload::ReloadError::NotHere.into())
                    }
                    control::Request::Upgrade { .. } => {
                        Err(control::RequestError::Upgrade("upgrades are the supervisor's, not a worker's".into()))
                    }
                    control::Request::Guard { .. } => {
                        Err(control::RequestError::Guard("the guard is the supervisor's, not a worker's".into()))
                    }
                };
                match &r {
                    Ok(msg) => log::debug!("{msg}"),
                    Err(e) => log::warn!("command refused: {e}"),
                }
                let _ = m.reply.send(r);
            }
        }
    }
    log::info!("stopping: {} connection(s) open", stats.active.load(Relaxed));
    accepts.abort_all();
    while accepts.join_next().await.is_some() {}
    // Clients accepted already are seen through to the holder (or reset):
    // the ones still in the listen backlog wait for the slot's next worker.
    let deadline = std::time::Instant::now() + IN_FLIGHT_GRACE;
    while shared.in_flight.load(Relaxed) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dataplane.shutdown();
    if let Some(t) = publish_task {
        t.abort();
    }
    if let Some(p) = publisher {
        p.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
    let s = stats.snapshot();
    log::info!(
        "stopped: {} connections served, {} rejected, {} connect failures",
        s.accepted,
        s.rejected,
        s.connect_failures
    );
    Ok(())
}
