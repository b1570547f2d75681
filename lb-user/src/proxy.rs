//! The proxy: accept clients, pick a server and a source address, connect,
//! hand both sockets to the data plane.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use tokio::sync::mpsc;

use crate::{
    backend::ClientAddr,
    config::{Config, FrontendConfig, Overrides, fds_needed},
    control,
    dataplane::{self, ConnAddrs, Dataplane, Kind, Socks, Spliced},
    publish::Publisher,
    runtime::Command,
    runtime::{BackendRt, Backends, ReloadError},
    select::Candidate,
    stats::{CloseReason, ConnGuard, PairState, ProxyStats, ServerState},
    sys,
};

/// Listen backlog for frontends.
const BACKLOG: i32 = 4096;
/// Shortest gap between two "out of source ports" warnings of one backend.
const EXHAUSTION_WARN_EVERY: Duration = Duration::from_secs(5);

/// What `lb run --announce` prints on stdout once it serves traffic.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub event: String,
    pub pid: u32,
    pub dataplane: Kind,
    pub frontends: Vec<ReadyFrontend>,
    /// Worker processes (empty when lb runs as one process).
    #[serde(default)]
    pub workers: Vec<u32>,
    /// Where the metrics endpoint listens, if configured.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadyFrontend {
    pub name: String,
    pub listen: SocketAddr,
}

struct Shared {
    access_log: bool,
    backends: Arc<Backends>,
    dataplane: Arc<dyn Dataplane>,
    stats: Arc<ProxyStats>,
    connect_timeout: Duration,
    queue_timeout: Duration,
    connect_attempts: u32,
}

/// Binds a frontend listener; `reuseport` for workers sharing one address.
pub fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    if reuseport {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    sock.listen(BACKLOG as u32)
}

/// Binds every frontend before anything else starts: a busy address is an
/// error naming the frontend.
pub fn bind_all(frontends: &[FrontendConfig], reuseport: bool) -> anyhow::Result<Vec<(FrontendConfig, TcpListener)>> {
    frontends
        .iter()
        .map(|f| {
            let l =
                bind(f.listen, reuseport).with_context(|| format!("frontend \"{}\": listen {}", f.name, f.listen))?;
            Ok((f.clone(), l))
        })
        .collect()
}

/// Raises the soft open-files limit to the hard one and warns when this
/// process's share of `maxconn` cannot fit.
pub fn raise_fd_limit(maxconn_here: u32) {
    match sys::raise_nofile_limit() {
        Ok((soft, _)) => {
            let need = fds_needed(maxconn_here);
            if soft < need {
                log::warn!(
                    "open-files limit is {soft}: at most ~{} connections fit in this process (it may take \
                     {maxconn_here}); raise LimitNOFILE or add workers",
                    soft.saturating_sub(crate::config::FD_RESERVE) / 2,
                );
            }
        }
        Err(e) => log::warn!("cannot read or raise the open-files limit: {e}"),
    }
}

/// How one process serves: as the only process, or as worker `worker`.
pub struct Serve {
    pub cfg: Config,
    pub kind: Kind,
    /// Whether the pinned maps exist (stats are published there).
    pub maps: bool,
    pub worker: u16,
    /// Runtime commands to apply before serving (a restarted worker catches up).
    pub replay: Vec<Command>,
    /// Requests from the control socket (or, in a worker, from the supervisor).
    pub ctl: mpsc::Receiver<control::Msg>,
    /// Where `reload` and SIGHUP read the configuration from: `Some` in a
    /// single process; `None` in a supervised worker, whose supervisor also
    /// runs the health checks and logs the commands it relays.
    pub reload: Option<Reload>,
}

/// The file a reload reads, with the command line's overrides.
pub struct Reload {
    pub path: std::path::PathBuf,
    pub overrides: Overrides,
}

/// Reads the file again: the new configuration and the commands that turn
/// the running server sets into its servers, or why the file is rejected
/// whole. The commands need no check of their own: the file was validated,
/// and they are derived from the running state in the order they apply
/// (a server whose `maxconn` changes is removed, then added again).
pub fn plan_reload(src: &Reload, current: &Config, backends: &Backends) -> Result<(Config, Vec<Command>), ReloadError> {
    let (new, _) = Config::load_with(&src.path, &src.overrides)?;
    let cmds = backends.diff(current, &new)?;
    Ok((new, cmds))
}

/// Reads the file again and applies its server changes, or nothing.
pub fn reload(src: &Reload, current: &mut Config, backends: &Backends) -> Result<String, ReloadError> {
    let (new, cmds) = plan_reload(src, current, backends)?;
    for c in &cmds {
        let m = backends.apply(c).map_err(ReloadError::Apply)?;
        log::info!("reload: {m}");
    }
    *current = new;
    Ok(format!("reloaded {}: {} change(s)", src.path.display(), cmds.len()))
}

/// Serves `listeners` until SIGINT or SIGTERM; then stops accepting, closes
/// every connection and stops the data plane. `ready` gets the announcement.
pub async fn serve(
    spec: Serve,
    listeners: Vec<(FrontendConfig, TcpListener)>,
    ready: impl FnOnce(Ready),
) -> anyhow::Result<()> {
    let Serve { mut cfg, kind, maps, worker, replay, mut ctl, reload: reload_src } = spec;
    let per_worker = cfg.maxconn_per_worker();
    raise_fd_limit(per_worker);
    let stats = Arc::new(ProxyStats::default());
    let dataplane = dataplane::open(kind, &cfg.pin_path, stats.clone(), cfg.timeouts.idle, worker)?;

    let backends = Arc::new(Backends::new(&cfg));
    for c in &replay {
        if let Err(e) = backends.apply(c) {
            log::warn!("replaying {c:?}: {e}");
        }
    }
    let supervised = reload_src.is_none();
    if !supervised {
        crate::health::start(&backends, None);
    }
    let publisher = if maps {
        let m = crate::bpf::StatMaps::open(&cfg.pin_path)
            .map_err(|e| anyhow::anyhow!("opening the stats maps at {}: {e}", cfg.pin_path.display()))?;
        Some(Arc::new(Mutex::new(Publisher::new(m, worker, backends.clone(), stats.clone()))))
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
    });

    let global = Arc::new(Semaphore::new(per_worker as usize));
    let mut announce = Ready {
        event: "ready".into(),
        pid: std::process::id(),
        dataplane: kind,
        frontends: vec![],
        workers: vec![],
        metrics: None,
    };
    let mut accepts = JoinSet::new();
    for (f, l) in listeners {
        let addr = l.local_addr()?;
        log::info!(
            "frontend \"{}\" listening on {addr} -> backend \"{}\"",
            f.name,
            shared.backends.list[f.backend].name
        );
        announce.frontends.push(ReadyFrontend { name: f.name.clone(), listen: addr });
        let own = f.maxconn.map(|m| Arc::new(Semaphore::new(m.div_ceil(cfg.workers) as usize)));
        accepts.spawn(accept_loop(l, f.backend, global.clone(), own, shared.clone()));
    }
    ready(announce);

    let stop = wait_for_signal();
    tokio::pin!(stop);
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            r = &mut stop => {
                r?;
                break;
            }
            _ = hup.recv(), if reload_src.is_some() => {
                log::info!("SIGHUP received: reloading");
                if let Some(src) = &reload_src {
                    match reload(src, &mut cfg, &shared.backends) {
                        Ok(m) => log::info!("{m}"),
                        Err(e) => log::error!("{e}"),
                    }
                }
            }
            Some(m) = ctl.recv() => {
                let r: control::Response = match m.req {
                    control::Request::Apply(c) => shared.backends.apply(&c).map_err(Into::into).inspect(|msg| {
                        if supervised {
                            log::debug!("{msg}");
                        } else {
                            log::info!("{msg}");
                        }
                    }),
                    control::Request::Other { cmd: control::Other::Reload } => match &reload_src {
                        Some(src) => reload(src, &mut cfg, &shared.backends).map_err(Into::into),
                        None => Err(ReloadError::NotHere.into()),
                    },
                };
                if let Err(e) = &r {
                    log::warn!("control request refused: {e}");
                }
                let _ = m.reply.send(r);
            }
        }
    }
    log::info!("stopping: closing listeners and {} connections", stats.active.load(Relaxed));
    accepts.abort_all();
    while accepts.join_next().await.is_some() {}
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

/// What the process that owns an instance runs besides serving traffic:
/// the eBPF object and its pins, the metrics endpoint and the control
/// socket. Dropping it stops them and removes the pins and the socket.
pub struct Owner {
    pub kind: Kind,
    objects: Option<crate::bpf::Objects>,
    /// Where the metrics endpoint listens, if configured.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    control: Option<tokio::task::JoinHandle<()>>,
    control_path: std::path::PathBuf,
}

impl Owner {
    /// Starts everything, after the frontends are bound; requests to the
    /// control socket arrive on the returned channel.
    pub async fn start(cfg: &Config) -> anyhow::Result<(Self, mpsc::Receiver<control::Msg>)> {
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(crate::metrics::bind(a).await?),
            None => None,
        };
        let (kind, objects) = dataplane::load(cfg)?;
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = metrics.map(|l| crate::metrics::serve(l, cfg.pin_path.clone()));
        let mut owner =
            Owner { kind, objects, metrics_addr, metrics, control: None, control_path: cfg.control_socket.clone() };
        let (tx, ctl) = mpsc::channel(16);
        owner.control = Some(control::listen(&owner.control_path, tx)?);
        Ok((owner, ctl))
    }

    /// Whether the pinned maps exist (the userspace plane may run without).
    pub fn maps(&self) -> bool {
        self.objects.is_some()
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            c.abort();
            let _ = std::fs::remove_file(&self.control_path);
        }
        if let Some(m) = self.metrics.take() {
            m.abort();
        }
        if let Some(o) = self.objects.as_mut() {
            o.close();
        }
    }
}

/// Runs lb as one process until SIGINT or SIGTERM.
pub async fn run(cfg: Config, reload_src: Reload, announce: bool) -> anyhow::Result<()> {
    // Bind everything first: a busy address is an error before anything starts.
    let listeners = bind_all(&cfg.frontends, false)?;
    let (owner, ctl) = Owner::start(&cfg).await?;
    log::info!("data plane: {}", owner.kind);
    let metrics_addr = owner.metrics_addr;
    let spec =
        Serve { cfg, kind: owner.kind, maps: owner.maps(), worker: 0, replay: vec![], ctl, reload: Some(reload_src) };
    let r = serve(spec, listeners, |mut ready| {
        ready.metrics = metrics_addr;
        if announce {
            println!("{}", serde_json::to_string(&ready).unwrap_or_default());
        }
    })
    .await;
    drop(owner);
    r
}

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

async fn accept_loop(
    listener: TcpListener,
    backend: usize,
    global: Arc<Semaphore>,
    frontend: Option<Arc<Semaphore>>,
    shared: Arc<Shared>,
) {
    let mut last_warn: Option<Instant> = None;
    loop {
        // At maxconn, stop accepting: new clients wait in the listen backlog.
        let mut permits = [None, None];
        if let Some(f) = &frontend {
            let Ok(p) = f.clone().acquire_owned().await else { return };
            permits[0] = Some(p);
        }
        let Ok(p) = global.clone().acquire_owned().await else { return };
        permits[1] = Some(p);
        match listener.accept().await {
            Ok((client, addr)) => {
                shared.stats.accepted.fetch_add(1, Relaxed);
                tokio::spawn(handle(client, ClientAddr(addr), backend, permits, shared.clone()));
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    log::warn!("accept failed: {e}");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

enum ConnectError {
    /// Every source address of the server is out of ports.
    NoPort,
    Io(io::Error),
}

/// A socket for `server` from `pair`'s source address.
fn socket_for(server: &ServerState, pair: &PairState) -> io::Result<TcpSocket> {
    let addr = server.cfg.addr.0;
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = pair.source {
        sys::set_bind_address_no_port(&sock)?;
        sock.bind(SocketAddr::new(src, 0))?;
    }
    if let Some((lo, hi)) = server.port_range {
        sys::set_local_port_range(&sock, lo, hi)?;
    }
    Ok(sock)
}

/// Connects to `server` from its least used source address that has ports left.
async fn connect_server(server: &ServerState, timeout: Duration) -> Result<(TcpStream, Arc<PairState>), ConnectError> {
    for pair in server.source_order() {
        let attempt = async {
            let sock = socket_for(server, &pair)?;
            match tokio::time::timeout(timeout, sock.connect(server.cfg.addr.0)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
            }
        };
        // Counted from the attempt on, so concurrent connects spread out
        // instead of all picking the same least-used address.
        pair.in_use.fetch_add(1, Relaxed);
        let r = attempt.await;
        if r.is_err() {
            pair.in_use.fetch_sub(1, Relaxed);
        }
        match r {
            Ok(s) => return Ok((s, pair)),
            // No local port left for this (source, server) pair: connect()
            // says EADDRNOTAVAIL; a bind() that had to pick a port, EADDRINUSE.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)) => {
                log::debug!("{}: no free port from {}", server.cfg.addr, source_name(pair.source));
                pair.mark_full();
            }
            Err(e) => return Err(ConnectError::Io(e)),
        }
    }
    Err(ConnectError::NoPort)
}

fn source_name(s: Option<IpAddr>) -> String {
    s.map_or_else(|| "the kernel-chosen address".into(), |a| a.to_string())
}

/// Why a client got no server.
#[derive(Debug)]
enum Reject {
    Unreachable,
    /// Every server is down, draining, disabled or at weight 0.
    NoServerUp,
    NoSourcePort,
    QueueFull,
    QueueTimeout,
}

/// Leaves the backend queue on drop.
struct QueueTicket<'a>(&'a BackendRt, &'a ProxyStats);

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
        self.1.queued.fetch_sub(1, Relaxed);
    }
}

async fn pick_and_connect(
    be: &BackendRt,
    shared: &Shared,
    client: ClientAddr,
) -> Result<(TcpStream, Arc<ServerState>, Arc<PairState>), Reject> {
    let deadline = tokio::time::Instant::now() + shared.queue_timeout;
    let mut ticket: Option<QueueTicket<'_>> = None;
    loop {
        // Registered before looking, so a slot freed meanwhile still wakes us.
        let freed = be.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();

        let servers = be.servers();
        let eligible: Vec<&Arc<ServerState>> = servers.iter().filter(|s| s.eligible()).collect();
        if eligible.is_empty() {
            return Err(Reject::NoServerUp);
        }
        let cands: Vec<Candidate> = eligible
            .iter()
            .map(|s| Candidate { id: s.id, weight: s.weight.load(Relaxed), active: s.active.load(Relaxed) })
            .collect();
        let (mut attempts, mut skipped_full, mut out_of_ports) = (0, false, false);
        for i in be.balancer.order(&cands, client.0.ip()) {
            let server = eligible[i];
            if attempts >= shared.connect_attempts {
                break;
            }
            if !server.try_reserve() {
                skipped_full = true;
                continue;
            }
            match connect_server(server, shared.connect_timeout).await {
                Ok((s, pair)) => return Ok((s, server.clone(), pair)),
                Err(ConnectError::NoPort) => {
                    server.release();
                    server.connect_failures.fetch_add(1, Relaxed);
                    out_of_ports = true;
                }
                Err(ConnectError::Io(e)) => {
                    server.release();
                    server.connect_failures.fetch_add(1, Relaxed);
                    shared.stats.connect_failures.fetch_add(1, Relaxed);
                    attempts += 1;
                    log::debug!("client {client}: connect to {} failed (attempt {attempts}): {e}", server.cfg.addr);
                }
            }
        }
        if skipped_full && attempts < shared.connect_attempts {
            if ticket.is_none() {
                if be.waiting.load(Relaxed) >= u64::from(be.queue) {
                    return Err(Reject::QueueFull);
                }
                be.waiting.fetch_add(1, Relaxed);
                shared.stats.queued.fetch_add(1, Relaxed);
                ticket = Some(QueueTicket(be, &shared.stats));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Reject::QueueTimeout);
            }
            continue;
        }
        return Err(if out_of_ports { Reject::NoSourcePort } else { Reject::Unreachable });
    }
}

/// Warns, at most every few seconds per backend, which servers ran out of
/// source ports on which addresses.
fn warn_exhausted(be: &BackendRt) {
    let mut w = be.exhaustion_warn.lock().unwrap_or_else(|e| e.into_inner());
    w.1 += 1;
    if w.0.is_some_and(|t| t.elapsed() < EXHAUSTION_WARN_EVERY) {
        return;
    }
    let full: Vec<String> = be
        .servers()
        .iter()
        .map(|s| {
            let srcs: Vec<String> = s.pairs.iter().map(|p| source_name(p.source)).collect();
            format!("{} on {}", s.cfg.addr, srcs.join(", "))
        })
        .collect();
    log::warn!(
        "backend \"{}\": out of source ports ({} client(s) closed): {}; add addresses to source_pool",
        be.name,
        w.1,
        full.join("; ")
    );
    *w = (Some(Instant::now()), 0);
}

async fn handle(
    client: TcpStream,
    addr: ClientAddr,
    backend: usize,
    permits: [Option<OwnedSemaphorePermit>; 2],
    shared: Arc<Shared>,
) {
    let mut guard = ConnGuard::new(shared.stats.clone(), permits, addr.0, shared.access_log);
    let be = &shared.backends.list[backend];
    let (server, target, pair) = match pick_and_connect(be, &shared, addr).await {
        Ok(v) => v,
        Err(why) => {
            let stats = &shared.stats;
            stats.rejected.fetch_add(1, Relaxed);
            guard.set_reason(CloseReason::Rejected(match why {
                Reject::NoSourcePort => "no_source_port",
                Reject::QueueFull => "queue_full",
                Reject::QueueTimeout => "queue_timeout",
                Reject::NoServerUp => "no_server_up",
                Reject::Unreachable => "unreachable",
            }));
            match why {
                Reject::NoSourcePort => {
                    stats.no_source_port.fetch_add(1, Relaxed);
                    warn_exhausted(be);
                }
                Reject::QueueFull | Reject::QueueTimeout => {
                    stats.queue_rejected.fetch_add(1, Relaxed);
                }
                Reject::NoServerUp => {
                    stats.no_server_up.fetch_add(1, Relaxed);
                }
                Reject::Unreachable => {}
            }
            log::debug!("client {addr}: no server of backend \"{}\" ({why:?}); resetting", be.name);
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let target_addr = target.cfg.addr;
    guard.connected(target, pair);
    let source = match server.local_addr() {
        Ok(a) => a,
        Err(e) => {
            log::warn!("client {addr} -> {target_addr}: {e}; both sides reset");
            for s in [&client, &server] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            return;
        }
    };
    guard.set_source(source);
    let addrs = ConnAddrs { client: addr.0, source, server: target_addr.0 };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    let (client, server) = match (client.into_std(), server.into_std()) {
        (Ok(c), Ok(s)) => (c, s),
        (c, s) => {
            for r in [&c, &s] {
                match r {
                    Ok(sock) => {
                        let _ = sys::set_linger_zero(sock);
                    }
                    Err(e) => log::warn!("client {addr}: leaving the runtime failed: {e}"),
                }
            }
            return;
        }
    };
    if let Err(e) = shared.dataplane.splice(Spliced { socks: Socks::new(client, server), guard, addrs }) {
        log::warn!("client {addr} -> {target_addr}: {e}; both sides reset");
    }
}
