//! A holder process (`lb holder`, started by the supervisor, one per worker
//! slot): binds the slot's frontend sockets, keeps the connections the
//! slot's workers splice, and forwards their ends ([`crate::dataplane::holder`]).
//! It reads no configuration: its spec (stdin, one JSON line) says all it
//! needs. SIGTERM closes every connection it holds.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::wait_for_signal;
use crate::{
    dataplane::holder::{Holder, WatchConf, take_over},
    kernel::maps::ConnMaps,
    proxy::accept,
};

/// What a holder gets on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HolderSpec {
    pub index: u16,
    pub pin_path: PathBuf,
    /// Where the slot's workers find it.
    pub socket: PathBuf,
    /// Concrete listen address of each frontend, in config order.
    pub listen: Vec<SocketAddr>,
    /// Whether it holds spliced connections (kernel data plane).
    pub kernel: bool,
    /// `timeouts.idle`.
    pub idle: Duration,
    /// `splice_queue_limit`.
    #[serde(default)]
    pub splice_queue_limit: u64,
    /// The supervisor's pid: the holder ends with that process.
    pub supervisor: u32,
    /// Take the listeners and connections from the holder of an earlier
    /// binary serving at `socket` (`lb upgrade`) instead of binding.
    #[serde(default)]
    pub takeover: bool,
}

/// The line a holder prints once it serves.
#[derive(Debug, Serialize, Deserialize)]
pub struct HolderReady {
    pub pid: u32,
    /// Connections taken over from the old holder (`takeover`).
    #[serde(default)]
    pub took: usize,
}

/// `lb holder`.
pub async fn run() -> anyhow::Result<()> {
    let (spec, _stdin) = super::child_spec("holder", |s: &HolderSpec| s.supervisor).await?;
    // Two descriptors per connection held; the limit warning is the workers'.
    let _ = crate::kernel::sys::raise_nofile_limit();
    let pin_path = spec.kernel.then_some(spec.pin_path.as_path());
    let conf = WatchConf { idle: spec.idle, queue: spec.splice_queue_limit, slot: spec.index };
    let (mut holder, took) = if spec.takeover {
        // `lb upgrade`: everything comes from the slot's holder of the old binary.
        take_over(&spec.socket, pin_path, conf).context("taking over from the old holder")?
    } else {
        let listeners = spec
            .listen
            .iter()
            .map(|a| {
                let l = accept::bind(*a, true).with_context(|| format!("listen {a}"))?;
                Ok(l.into_std()?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(p) = pin_path {
            let mut m =
                ConnMaps::open(p).map_err(|e| anyhow::anyhow!("opening the pinned maps at {}: {e}", p.display()))?;
            let stale = m.forget_worker(spec.index, &Default::default());
            if stale > 0 {
                log::info!("removed {stale} connection records left by an earlier holder of slot {}", spec.index);
            }
        }
        (Holder::new(listeners, pin_path, conf)?, 0)
    };
    holder.bind(&spec.socket).with_context(|| format!("holder socket {}", spec.socket.display()))?;
    let holder = Arc::new(holder);
    let h = holder.clone();
    std::thread::Builder::new().name("lb-holder".into()).spawn(move || h.serve())?;
    println!("{}", serde_json::to_string(&HolderReady { pid: std::process::id(), took })?);
    wait_for_signal().await?;
    holder.stop();
    let _ = std::fs::remove_file(&spec.socket);
    log::info!("holder stopped");
    Ok(())
}
