//! What the supervisor runs besides its workers: the eBPF object and its
//! pins, the metrics endpoint and the control socket. Dropping the
//! [`Owner`] stops them and removes the pins and the socket.

use std::{net::SocketAddr, path::PathBuf};

use tokio::sync::mpsc;

use crate::{
    config::Config,
    control,
    dataplane::{self, Kind},
    kernel::object::Objects,
    observe::metrics,
};

pub struct Owner {
    pub kind: Kind,
    objects: Option<Objects>,
    /// Where the metrics endpoint listens, if configured.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    control: Option<(tokio::task::JoinHandle<()>, crate::kernel::lock::Lock)>,
    control_path: PathBuf,
}

impl Owner {
    /// Starts everything, after the frontends are bound; requests to the
    /// control socket arrive on the returned channel.
    pub async fn start(cfg: &Config) -> anyhow::Result<(Self, mpsc::Receiver<control::Msg>)> {
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(metrics::bind(a).await?),
            None => None,
        };
        let (kind, objects) = dataplane::load(cfg)?;
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = metrics.map(|l| metrics::serve(l, cfg.pin_path.clone(), cfg.runtime_dir.clone()));
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
        if let Some((task, lock)) = self.control.take() {
            // Only the instance holding the lock gets here: the socket and
            // the lock file are its own.
            task.abort();
            let _ = std::fs::remove_file(&self.control_path);
            let _ = std::fs::remove_file(&lock.path);
        }
        if let Some(m) = self.metrics.take() {
            m.abort();
        }
        if let Some(o) = self.objects.as_mut() {
            o.close();
        }
    }
}
