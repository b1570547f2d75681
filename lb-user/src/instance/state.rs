//! What the supervisor works on: its model of the instance (the
//! configuration, the server set, each slot's worker and holder), and the
//! children it waits for. The supervisor's loop (`supervisor`)
//! and an upgrade's two sides work on it.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::process::Child;

use super::{
    Reload,
    children::{Slot, Waits, stop_all},
    holder::HolderSpec,
    worker::WorkerSpec,
};
use crate::{
    config::Config,
    dataplane::Kind,
    servers::{Backends, command::Command},
};

/// Everything the supervisor's loop works on.
pub(super) struct Supervisor {
    pub(super) cfg: Config,
    pub(super) reload: Reload,
    /// The spec every worker starts from (its `replay` filled at spawn).
    pub(super) spec: WorkerSpec,
    pub(super) model: Arc<Backends>,
    /// Operator commands applied so far (health goes as current states).
    pub(super) replay: Vec<Command>,
    pub(super) slots: Vec<Slot>,
    /// Each slot's holder: how to start it, and its pid while it runs.
    pub(super) holders: Vec<(HolderSpec, Option<u32>)>,
}

impl Supervisor {
    /// The model of an instance of `cfg` serving `listen` on `kind`, no
    /// process started yet.
    pub(super) fn new(
        cfg: Config,
        reload: Reload,
        config_text: String,
        kind: Kind,
        maps: bool,
        listen: Vec<SocketAddr>,
    ) -> Self {
        let spec = WorkerSpec {
            index: 0,
            config_file: reload.path.display().to_string(),
            config_text,
            workers: cfg.workers,
            maxconn: reload.overrides.maxconn,
            kind,
            maps,
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
                    kernel: kind == Kind::Kernel,
                    packet: kind == Kind::Kernel && cfg.packet_plane(),
                    idle: cfg.timeouts.idle,
                    splice_queue_limit: cfg.splice_queue_limit,
                    supervisor: std::process::id(),
                    lock: lb_common::files::holder_lock(&cfg.runtime_dir, &cfg.pin_path, index),
                    takeover: false,
                    beat: Some((
                        lb_common::files::holder_beat(&cfg.runtime_dir, &cfg.pin_path, index),
                        super::watchdog::beat_every(cfg.timeouts.worker),
                    )),
                };
                (spec, None)
            })
            .collect();
        Supervisor { cfg, reload, spec, model, replay: Vec::new(), slots, holders }
    }
}

/// The supervisor's children, by slot, as their exits come in.
#[derive(Default)]
pub(super) struct Procs {
    pub(super) workers: Waits,
    pub(super) holders: Waits,
}

impl Procs {
    pub(super) fn watch_worker(&mut self, i: usize, child: Child) {
        self.workers.watch(i, child);
    }
    pub(super) fn watch_holder(&mut self, i: usize, child: Child) {
        self.holders.watch(i, child);
    }
    /// Stops every worker, then every holder (which close their connections).
    pub(super) async fn stop(&mut self) {
        stop_all(&mut self.workers).await;
        stop_all(&mut self.holders).await;
    }
}
