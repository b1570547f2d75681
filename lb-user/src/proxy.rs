//! The proxy: accept clients, pick and connect a server, hand both sockets
//! to the data plane.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinSet,
};

use crate::{
    backend::{ClientAddr, ServerAddr},
    config::{BackendConfig, Config},
    dataplane::{self, Dataplane, Spliced},
    select::{Balancer, RoundRobin},
    stats::{ConnGuard, ProxyStats},
    sys,
};

/// Listen backlog for frontends.
const BACKLOG: i32 = 4096;

/// What `lb run --announce` prints on stdout once it serves traffic.
#[derive(Debug, Serialize)]
pub struct Ready {
    pub event: &'static str,
    pub pid: u32,
    pub dataplane: String,
    pub frontends: Vec<ReadyFrontend>,
}

#[derive(Debug, Serialize)]
pub struct ReadyFrontend {
    pub name: String,
    pub listen: SocketAddr,
}

struct BackendRt {
    cfg: BackendConfig,
    balancer: RoundRobin,
}

struct Shared {
    backends: Vec<BackendRt>,
    dataplane: Arc<dyn Dataplane>,
    stats: Arc<ProxyStats>,
    connect_timeout: Duration,
    connect_attempts: u32,
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG as u32)
}

/// Runs until SIGINT or SIGTERM; then stops accepting, closes every
/// connection and releases the data plane.
pub async fn run(cfg: Config, announce: bool) -> anyhow::Result<()> {
    match sys::raise_nofile_limit() {
        Ok((soft, _)) => {
            let need = u64::from(cfg.max_connections) * 2 + 64;
            if soft < need {
                log::warn!(
                    "open-files limit is {soft}: at most ~{} connections fit in this process \
                     (max_connections = {}); raise LimitNOFILE",
                    soft.saturating_sub(64) / 2,
                    cfg.max_connections
                );
            }
        }
        Err(e) => log::warn!("cannot read or raise the open-files limit: {e}"),
    }

    // Bind everything first: a busy address is an error before anything starts.
    let mut listeners = Vec::new();
    for f in &cfg.frontends {
        let l = bind(f.listen).with_context(|| format!("frontend \"{}\": listen {}", f.name, f.listen))?;
        listeners.push((f.clone(), l));
    }

    let stats = Arc::new(ProxyStats::default());
    let dataplane = dataplane::start(&cfg, stats.clone())?;
    log::info!("data plane: {}", dataplane.kind());

    let shared = Arc::new(Shared {
        backends: cfg.backends.iter().map(|b| BackendRt { cfg: b.clone(), balancer: RoundRobin::default() }).collect(),
        dataplane: dataplane.clone(),
        stats: stats.clone(),
        connect_timeout: cfg.timeouts.connect,
        connect_attempts: cfg.connect_attempts,
    });

    let mut ready =
        Ready { event: "ready", pid: std::process::id(), dataplane: dataplane.kind().to_string(), frontends: vec![] };
    let mut accepts = JoinSet::new();
    for (f, l) in listeners {
        let addr = l.local_addr()?;
        log::info!(
            "frontend \"{}\" listening on {addr} -> backend \"{}\"",
            f.name,
            shared.backends[f.backend].cfg.name
        );
        ready.frontends.push(ReadyFrontend { name: f.name.clone(), listen: addr });
        accepts.spawn(accept_loop(l, f.backend, shared.clone()));
    }
    if announce {
        println!("{}", serde_json::to_string(&ready)?);
    }

    wait_for_signal().await?;
    log::info!("stopping: closing listeners and {} connections", stats.active.load(Relaxed));
    accepts.abort_all();
    while accepts.join_next().await.is_some() {}
    dataplane.shutdown();
    let s = stats.snapshot();
    log::info!(
        "stopped: {} connections served, {} rejected, {} connect failures",
        s.accepted,
        s.rejected,
        s.connect_failures
    );
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, backend: usize, shared: Arc<Shared>) {
    let mut last_warn: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((client, addr)) => {
                shared.stats.accepted.fetch_add(1, Relaxed);
                tokio::spawn(handle(client, ClientAddr(addr), backend, shared.clone()));
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

async fn connect(server: ServerAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if server.0.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    match tokio::time::timeout(timeout, sock.connect(server.0)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

async fn handle(client: TcpStream, addr: ClientAddr, backend: usize, shared: Arc<Shared>) {
    let guard = ConnGuard::new(shared.stats.clone());
    let be = &shared.backends[backend];
    let n = be.cfg.servers.len();
    let mut idx = be.balancer.first(n);
    let attempts = (shared.connect_attempts as usize).min(n.max(1));
    let mut server = None;
    for attempt in 0..attempts {
        let target = be.cfg.servers[idx];
        match connect(target, shared.connect_timeout).await {
            Ok(s) => {
                server = Some((s, target));
                break;
            }
            Err(e) => {
                shared.stats.connect_failures.fetch_add(1, Relaxed);
                log::debug!("client {addr}: connect to {target} failed (attempt {}): {e}", attempt + 1);
                idx = be.balancer.next(idx, n);
            }
        }
    }
    let Some((server, target)) = server else {
        shared.stats.rejected.fetch_add(1, Relaxed);
        log::debug!("client {addr}: no server of backend \"{}\" reachable; closing", be.cfg.name);
        return;
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    let (client, server) = match (client.into_std(), server.into_std()) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("client {addr}: leaving the runtime failed: {e}");
            return;
        }
    };
    if let Err(e) = shared.dataplane.splice(Spliced { client, server, guard }) {
        log::warn!("client {addr} -> {target}: {e}");
    }
}
