//! The live server set of every backend, and the operator's commands that
//! change it (`lb server …`, reload). Changes affect only new connections:
//! a connection holds its server's state until it ends.

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    backend::ServerAddr,
    config::{BackendConfig, Config, MAX_WEIGHT, ServerConfig, SourcePool},
    select::Balancer,
    stats::{Admin, ServerState},
};

/// A backend at run time.
pub struct BackendRt {
    pub index: usize,
    pub name: String,
    servers: RwLock<Arc<Vec<Arc<ServerState>>>>,
    /// Removed servers whose connections still run: stats keep showing them.
    retiring: Mutex<Vec<Arc<ServerState>>>,
    pub balancer: Balancer,
    pub slot_freed: Arc<Notify>,
    pool: SourcePool,
    pub health: Option<crate::config::HealthCheck>,
    /// Clients waiting for a slot now.
    pub waiting: AtomicU64,
    pub queue: u32,
    /// Last "out of source ports" warning, and rejections since.
    pub exhaustion_warn: Mutex<(Option<Instant>, u64)>,
}

impl BackendRt {
    fn new(index: usize, b: &BackendConfig) -> Self {
        let slot_freed = Arc::new(Notify::new());
        let servers =
            b.servers.iter().map(|s| Arc::new(ServerState::new(index, *s, &b.pool, slot_freed.clone()))).collect();
        Self {
            index,
            name: b.name.clone(),
            servers: RwLock::new(Arc::new(servers)),
            retiring: Mutex::new(Vec::new()),
            balancer: Balancer::new(b.balance),
            slot_freed,
            pool: b.pool.clone(),
            health: b.health.clone(),
            waiting: AtomicU64::new(0),
            queue: b.queue,
            exhaustion_warn: Mutex::new((None, 0)),
        }
    }

    /// The current servers (a snapshot; cheap).
    pub fn servers(&self) -> Arc<Vec<Arc<ServerState>>> {
        self.servers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn find(&self, addr: ServerAddr) -> Option<Arc<ServerState>> {
        self.servers().iter().find(|s| s.cfg.addr == addr).cloned()
    }
}

/// Called with each server added at run time.
type OnAdd = Box<dyn Fn(&BackendRt, Arc<ServerState>) + Send + Sync>;

/// Every backend.
pub struct Backends {
    pub list: Vec<BackendRt>,
    /// Called with each server added at run time (starts its health check).
    on_add: Mutex<Option<OnAdd>>,
}

/// An operator's command. Each worker applies the same list in the same order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    ServerAdd {
        backend: String,
        addr: ServerAddr,
        weight: u32,
        maxconn: Option<u32>,
    },
    ServerRemove {
        backend: String,
        addr: ServerAddr,
    },
    ServerState {
        backend: String,
        addr: ServerAddr,
        state: Admin,
    },
    ServerWeight {
        backend: String,
        addr: ServerAddr,
        weight: u32,
    },
    /// A health check flipped (the supervisor checks for all its workers).
    /// Not accepted from the control socket.
    ServerHealth {
        backend: String,
        addr: ServerAddr,
        up: bool,
    },
}

impl Backends {
    pub fn new(cfg: &Config) -> Self {
        Self {
            list: cfg.backends.iter().enumerate().map(|(i, b)| BackendRt::new(i, b)).collect(),
            on_add: Mutex::new(None),
        }
    }

    pub fn on_add(&self, f: impl Fn(&BackendRt, Arc<ServerState>) + Send + Sync + 'static) {
        *self.on_add.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    pub fn all_servers(&self) -> Vec<Arc<ServerState>> {
        self.list.iter().flat_map(|b| b.servers().iter().cloned().collect::<Vec<_>>()).collect()
    }

    /// Removed servers that still have connections (the others are let go).
    pub fn retiring_servers(&self) -> Vec<Arc<ServerState>> {
        let mut all = Vec::new();
        for b in &self.list {
            let mut r = b.retiring.lock().unwrap_or_else(|e| e.into_inner());
            r.retain(|s| s.active.load(Relaxed) > 0);
            all.extend(r.iter().cloned());
        }
        all
    }

    /// The health of every server that is down, as commands: what a worker
    /// started now must apply to agree with the checks so far.
    pub fn health_commands(&self) -> Vec<Command> {
        let mut v = Vec::new();
        for b in &self.list {
            for s in b.servers().iter().filter(|s| !s.up.load(Relaxed)) {
                v.push(Command::ServerHealth { backend: b.name.clone(), addr: s.cfg.addr, up: false });
            }
        }
        v
    }

    fn backend(&self, name: &str) -> Result<&BackendRt, CommandError> {
        self.list.iter().find(|b| b.name == name).ok_or_else(|| CommandError::NoBackend(name.to_owned()))
    }

    /// The server `addr` of backend `name`.
    fn server(&self, name: &str, addr: ServerAddr) -> Result<Arc<ServerState>, CommandError> {
        self.backend(name)?.find(addr).ok_or_else(|| CommandError::NoServer { backend: name.to_owned(), addr })
    }

    /// Checks a command without applying it.
    pub fn check(&self, cmd: &Command) -> Result<(), CommandError> {
        match cmd {
            Command::ServerAdd { backend, addr, weight, maxconn } => {
                let b = self.backend(backend)?;
                if b.find(*addr).is_some() {
                    return Err(CommandError::Duplicate { backend: backend.clone(), addr: *addr });
                }
                if addr.0.port() == 0 || addr.0.ip().is_unspecified() {
                    return Err(CommandError::NotConcrete(*addr));
                }
                if !b.pool.addrs.is_empty() && !b.pool.addrs.iter().any(|a| a.is_ipv4() == addr.0.is_ipv4()) {
                    return Err(CommandError::NoSourceOfFamily { backend: backend.clone(), addr: *addr });
                }
                check_weight(*weight)?;
                if *maxconn == Some(0) {
                    return Err(CommandError::ZeroMaxconn);
                }
            }
            Command::ServerRemove { backend, addr }
            | Command::ServerState { backend, addr, .. }
            | Command::ServerHealth { backend, addr, .. } => {
                self.server(backend, *addr)?;
            }
            Command::ServerWeight { backend, addr, weight } => {
                self.server(backend, *addr)?;
                check_weight(*weight)?;
            }
        }
        Ok(())
    }

    /// Applies a command; returns what changed, for the log and the reply.
    pub fn apply(&self, cmd: &Command) -> Result<String, CommandError> {
        self.check(cmd)?;
        let msg = match cmd {
            Command::ServerAdd { backend, addr, weight, maxconn } => {
                let b = self.backend(backend)?;
                let cfg = ServerConfig { addr: *addr, maxconn: *maxconn, weight: *weight };
                let s = Arc::new(ServerState::new(b.index, cfg, &b.pool, b.slot_freed.clone()));
                {
                    let mut list = b.servers.write().unwrap_or_else(|e| e.into_inner());
                    let mut v = (**list).clone();
                    v.push(s.clone());
                    *list = Arc::new(v);
                }
                if let Some(f) = self.on_add.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    f(b, s);
                }
                format!("backend \"{backend}\": server {addr} added (weight {weight})")
            }
            Command::ServerRemove { backend, addr } => {
                let b = self.backend(backend)?;
                let mut list = b.servers.write().unwrap_or_else(|e| e.into_inner());
                let removed = list.iter().find(|s| s.cfg.addr == *addr).cloned();
                let v: Vec<_> = list.iter().filter(|s| s.cfg.addr != *addr).cloned().collect();
                *list = Arc::new(v);
                drop(list);
                let live = removed.map_or(0, |s| {
                    // Its health check stops; its connections keep running.
                    s.set_admin(Admin::Disabled);
                    let live = s.active.load(Relaxed);
                    if live > 0 {
                        b.retiring.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                    }
                    live
                });
                format!("backend \"{backend}\": server {addr} removed ({live} connections continue until they end)")
            }
            Command::ServerState { backend, addr, state } => {
                let s = self.server(backend, *addr)?;
                s.set_admin(*state);
                let what = match state {
                    Admin::Enabled => "enabled",
                    Admin::Drain => "draining: no new connections, existing ones continue",
                    Admin::Disabled => "disabled (maint): no new connections, existing ones continue",
                };
                format!("backend \"{backend}\": server {addr} {what}")
            }
            Command::ServerWeight { backend, addr, weight } => {
                let s = self.server(backend, *addr)?;
                s.weight.store(*weight, Relaxed);
                format!("backend \"{backend}\": server {addr} weight {weight}")
            }
            Command::ServerHealth { backend, addr, up } => {
                self.server(backend, *addr)?.set_up(*up);
                format!("backend \"{backend}\": server {addr} is {}", if *up { "up" } else { "down" })
            }
        };
        Ok(msg)
    }

    /// The commands that turn the running server sets into `new`'s.
    /// Everything else must be unchanged: a reload changes servers only.
    pub fn diff(&self, old: &Config, new: &Config) -> Result<Vec<Command>, ReloadError> {
        let needs_restart = restart_keys(old, new);
        if !needs_restart.is_empty() {
            return Err(ReloadError::NeedsRestart(needs_restart));
        }
        let mut cmds = Vec::new();
        for (b, nb) in self.list.iter().zip(&new.backends) {
            let cur = b.servers();
            for s in cur.iter() {
                match nb.servers.iter().find(|n| n.addr == s.cfg.addr) {
                    None => cmds.push(Command::ServerRemove { backend: b.name.clone(), addr: s.cfg.addr }),
                    Some(n) if n.maxconn != s.cfg.maxconn => {
                        // maxconn is fixed per server state: replace it.
                        cmds.push(Command::ServerRemove { backend: b.name.clone(), addr: s.cfg.addr });
                        cmds.push(Command::ServerAdd {
                            backend: b.name.clone(),
                            addr: n.addr,
                            weight: n.weight,
                            maxconn: n.maxconn,
                        });
                    }
                    Some(n) if n.weight != s.weight.load(Relaxed) => {
                        cmds.push(Command::ServerWeight { backend: b.name.clone(), addr: n.addr, weight: n.weight })
                    }
                    Some(_) => {}
                }
            }
            for n in &nb.servers {
                if !cur.iter().any(|s| s.cfg.addr == n.addr) {
                    cmds.push(Command::ServerAdd {
                        backend: b.name.clone(),
                        addr: n.addr,
                        weight: n.weight,
                        maxconn: n.maxconn,
                    });
                }
            }
        }
        Ok(cmds)
    }
}

fn check_weight(w: u32) -> Result<(), CommandError> {
    if w > MAX_WEIGHT { Err(CommandError::Weight(w)) } else { Ok(()) }
}

/// Why an operator's command was refused. Nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no backend named \"{0}\"")]
    NoBackend(String),
    #[error("backend \"{backend}\" has no server {addr}")]
    NoServer { backend: String, addr: ServerAddr },
    #[error("backend \"{backend}\" already has server {addr}")]
    Duplicate { backend: String, addr: ServerAddr },
    #[error("{0}: needs a concrete ip and a non-zero port")]
    NotConcrete(ServerAddr),
    #[error("backend \"{backend}\": source_pool has no address of {addr}'s family")]
    NoSourceOfFamily { backend: String, addr: ServerAddr },
    #[error("weight {0}: must be between 0 and {MAX_WEIGHT}")]
    Weight(u32),
    #[error("maxconn must be at least 1")]
    ZeroMaxconn,
}

/// Why a reload was refused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload rejected: {0}")]
    Invalid(#[from] crate::config::LoadError),
    #[error(
        "reload rejected: {} changed; a reload applies server changes (servers, weight, maxconn) only: \
         restart lb for the others",
        .0.join(", ")
    )]
    NeedsRestart(Vec<String>),
    #[error("reload stopped half-way: {0}")]
    Apply(CommandError),
    #[error("reload stopped half-way: {0}")]
    Relay(String),
    #[error("reload goes to the supervisor, not a worker")]
    NotHere,
}

/// Every key that differs between `old` and `new` and that a reload cannot
/// apply (everything but the servers of each backend). The destructuring
/// names every field, so a new configuration key does not compile until
/// this function decides what a reload does with it.
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    let Config {
        dataplane,
        pin_path,
        control_socket,
        access_log,
        metrics_listen,
        workers,
        maxconn,
        connect_attempts,
        timeouts,
        frontends,
        backends,
    } = new;
    let mut keys = Vec::new();
    let mut differ = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_owned());
        }
    };
    differ("dataplane", *dataplane != old.dataplane);
    differ("pin_path", *pin_path != old.pin_path);
    differ("control_socket", *control_socket != old.control_socket);
    differ("access_log", *access_log != old.access_log);
    differ("metrics_listen", *metrics_listen != old.metrics_listen);
    differ("workers", *workers != old.workers);
    differ("maxconn", *maxconn != old.maxconn);
    differ("connect_attempts", *connect_attempts != old.connect_attempts);
    let crate::config::Timeouts { connect, queue, idle } = timeouts;
    differ("timeouts.connect", *connect != old.timeouts.connect);
    differ("timeouts.queue", *queue != old.timeouts.queue);
    differ("timeouts.idle", *idle != old.timeouts.idle);
    if frontends.len() != old.frontends.len() {
        differ("the list of [[frontend]]s", true);
    }
    for (f, o) in frontends.iter().zip(&old.frontends) {
        let crate::config::FrontendConfig { name, listen, backend, maxconn } = f;
        let at = |k: &str| format!("frontend \"{}\": {k}", o.name);
        differ(&at("name"), *name != o.name);
        differ(&at("listen"), *listen != o.listen);
        differ(&at("backend"), *backend != o.backend);
        differ(&at("maxconn"), *maxconn != o.maxconn);
    }
    if backends.len() != old.backends.len() {
        differ("the list of [[backend]]s", true);
    }
    for (b, o) in backends.iter().zip(&old.backends) {
        let BackendConfig { name, servers: _, pool, queue, balance, health } = b;
        let at = |k: &str| format!("backend \"{}\": {k}", o.name);
        differ(&at("name"), *name != o.name);
        differ(&at("source_pool or source_port_range"), *pool != o.pool);
        differ(&at("queue"), *queue != o.queue);
        differ(&at("balance"), *balance != o.balance);
        differ(&at("health"), *health != o.health);
    }
    keys
}
