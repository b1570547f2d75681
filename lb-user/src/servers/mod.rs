//! The servers of every backend at run time: the live set ([`Backends`]),
//! each server's state ([`server`]), how a server is chosen ([`balance`]),
//! health checks ([`health`]), the operator's commands ([`command`]) and
//! what a reload changes ([`reload`]). Changes affect only new
//! connections: a connection holds its server's state until it ends.

pub mod balance;
pub mod command;
pub mod health;
pub mod reload;
pub mod server;

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use tokio::sync::Notify;

use self::{
    balance::Balancer,
    command::{Command, CommandError},
    server::ServerState,
};
use crate::{
    addr::ServerAddr,
    config::{BackendConfig, Config, SourcePool},
};

/// A backend at run time.
pub struct BackendRt {
    pub index: usize,
    pub name: String,
    pub(crate) servers: RwLock<Arc<Vec<Arc<ServerState>>>>,
    /// Removed servers whose connections still run: stats keep showing them.
    pub(crate) retiring: Mutex<Vec<Arc<ServerState>>>,
    pub balancer: Balancer,
    pub slot_freed: Arc<Notify>,
    pub(crate) pool: SourcePool,
    pub health: Option<crate::config::HealthCheck>,
    /// PROXY protocol header written to each server connection.
    pub send_proxy: Option<crate::config::SendProxy>,
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
            send_proxy: b.send_proxy,
            waiting: AtomicU64::new(0),
            queue: b.queue,
            exhaustion_warn: Mutex::new((None, 0)),
        }
    }

    /// The current servers (a snapshot; cheap).
    pub fn servers(&self) -> Arc<Vec<Arc<ServerState>>> {
        self.servers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn find(&self, addr: ServerAddr) -> Option<Arc<ServerState>> {
        self.servers().iter().find(|s| s.cfg.addr == addr).cloned()
    }
}

/// Called with each server added at run time.
type OnAdd = Box<dyn Fn(&BackendRt, Arc<ServerState>) + Send + Sync>;

/// Every backend.
pub struct Backends {
    pub list: Vec<BackendRt>,
    /// Called with each server added at run time (starts its health check).
    pub(crate) on_add: Mutex<Option<OnAdd>>,
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

    pub(crate) fn backend(&self, name: &str) -> Result<&BackendRt, CommandError> {
        self.list.iter().find(|b| b.name == name).ok_or_else(|| CommandError::NoBackend(name.to_owned()))
    }

    /// The server `addr` of backend `name`.
    pub(crate) fn server(&self, name: &str, addr: ServerAddr) -> Result<Arc<ServerState>, CommandError> {
        self.backend(name)?.find(addr).ok_or_else(|| CommandError::NoServer { backend: name.to_owned(), addr })
    }
}
