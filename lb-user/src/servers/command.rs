//! The operator's commands (`lb server …`): checked, then applied to the
//! live set. Each worker applies the same list in the same order.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::{
    Backends,
    server::{Admin, ServerState},
};
use crate::{
    addr::ServerAddr,
    config::{MAX_WEIGHT, ServerConfig},
};

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
