//! Reload: the commands that turn the running server sets into a new
//! file's, or why the file is refused whole.

use std::sync::atomic::Ordering::Relaxed;

use super::{
    Backends,
    command::{Command, CommandError},
};
use crate::config::{BackendConfig, Config};

impl Backends {
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
        runtime_dir,
        control_socket,
        access_log,
        metrics_listen,
        workers,
        maxconn,
        connect_attempts,
        send_buffer,
        splice_queue_limit,
        kernel_memory,
        memory: _,
        timeouts,
        frontends,
        backends,
        guard,
    } = new;
    let mut keys = Vec::new();
    let mut differ = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_owned());
        }
    };
    differ("dataplane", *dataplane != old.dataplane);
    differ("pin_path", *pin_path != old.pin_path);
    differ("runtime_dir", *runtime_dir != old.runtime_dir);
    differ("control_socket", *control_socket != old.control_socket);
    differ("access_log", *access_log != old.access_log);
    differ("metrics_listen", *metrics_listen != old.metrics_listen);
    differ("workers", *workers != old.workers);
    differ("maxconn", *maxconn != old.maxconn);
    differ("connect_attempts", *connect_attempts != old.connect_attempts);
    differ("send_buffer", *send_buffer != old.send_buffer);
    differ("splice_queue_limit", *splice_queue_limit != old.splice_queue_limit);
    // The maps' capacities follow from the rest (servers added by a reload
    // use the rows kept for them at start).
    differ("kernel_memory", *kernel_memory != old.kernel_memory);
    let crate::config::Timeouts { connect, queue, idle, worker, client_hello } = timeouts;
    differ("timeouts.connect", *connect != old.timeouts.connect);
    differ("timeouts.queue", *queue != old.timeouts.queue);
    differ("timeouts.idle", *idle != old.timeouts.idle);
    differ("timeouts.worker", *worker != old.timeouts.worker);
    differ("timeouts.client_hello", *client_hello != old.timeouts.client_hello);
    // The guard's lists and rates are applied by a reload; where it is attached is not.
    let ifaces = |g: &Option<crate::config::GuardConfig>| g.as_ref().map(|g| g.interfaces.clone());
    differ("guard.interfaces", ifaces(guard) != ifaces(&old.guard));
    if frontends.len() != old.frontends.len() {
        differ("the list of [[frontend]]s", true);
    }
    for (f, o) in frontends.iter().zip(&old.frontends) {
        let crate::config::FrontendConfig { name, listen, backend, maxconn, first_byte_timeout, sni, splice } = f;
        let at = |k: &str| format!("frontend \"{}\": {k}", o.name);
        differ(&at("name"), *name != o.name);
        differ(&at("listen"), *listen != o.listen);
        differ(&at("backend"), *backend != o.backend);
        differ(&at("maxconn"), *maxconn != o.maxconn);
        differ(&at("first_byte_timeout"), *first_byte_timeout != o.first_byte_timeout);
        differ(&at("sni"), *sni != o.sni);
        differ(&at("splice"), *splice != o.splice);
    }
    if backends.len() != old.backends.len() {
        differ("the list of [[backend]]s", true);
    }
    for (b, o) in backends.iter().zip(&old.backends) {
        let BackendConfig { name, servers: _, pool, queue, balance, health, send_proxy } = b;
        let at = |k: &str| format!("backend \"{}\": {k}", o.name);
        differ(&at("name"), *name != o.name);
        differ(&at("source_pool or source_port_range"), *pool != o.pool);
        differ(&at("queue"), *queue != o.queue);
        differ(&at("balance"), *balance != o.balance);
        differ(&at("health"), *health != o.health);
        differ(&at("send_proxy"), *send_proxy != o.send_proxy);
    }
    keys
}
