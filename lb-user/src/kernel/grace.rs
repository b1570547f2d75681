//! An RCU grace period on demand, shared by every caller waiting at the
//! time: once it has passed, every eBPF program run that began before the
//! wait did has finished, and with it the packet's way through the stack
//! that the run was part of. A TC ingress program runs inside the receive
//! path's RCU read-side section, which lasts until the packet is in its
//! socket (or that socket's backlog): a packet the program let pass before
//! a map update has reached its socket once a grace period after the
//! update is over.
//!
//! `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` for
//! userspace (kernel/sched/membarrier.c). One thread makes the calls; a
//! caller registers, and is released by the first call that starts after
//! it registered. Where the command is refused (`nohz_full`), a sleep
//! stands in, far longer than the receive path takes.

use std::{sync::mpsc, time::Duration};

use tokio::sync::oneshot;

/// The stand-in when the kernel refuses the barrier.
const FALLBACK: Duration = Duration::from_millis(50);

pub struct Grace {
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl Grace {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<oneshot::Sender<()>>();
        std::thread::Builder::new().name("lb-grace".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiting = vec![first];
                waiting.extend(rx.try_iter());
                barrier();
                for w in waiting {
                    let _ = w.send(());
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Returns once a grace period that began after this call has passed.
    pub async fn wait(&self) {
        let (tx, rx) = oneshot::channel();
        match self.tx.send(tx) {
            Ok(()) => {
                if rx.await.is_err() {
                    tokio::time::sleep(FALLBACK).await;
                }
            }
            Err(_) => tokio::time::sleep(FALLBACK).await,
        }
    }
}

fn barrier() {
    if let Err(e) = rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global) {
        log::debug!("membarrier(GLOBAL): {e}; sleeping {FALLBACK:?} instead");
        std::thread::sleep(FALLBACK);
    }
}
