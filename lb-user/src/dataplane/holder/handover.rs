//! `lb upgrade` between two holders of one slot: the old one stops
//! watching (without closing anything) and sends the new one its listening
//! sockets and every connection with its state; the new one watches them,
//! says so, and the old one exits. Until the new one says so, the old one
//! keeps its own descriptors and resumes if anything goes wrong, so a
//! failed hand-over loses nothing.

use std::{
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustix::net::sockopt::Timeout;

use super::{
    Holder, WatchConf,
    wire::{self, Handed, ToHolder, ToWorker, VERSION},
};

/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

impl Holder {
    /// The old side: hands everything to the new holder on `conn` and
    /// exits once it has taken it; resumes watching on any failure.
    pub(super) fn hand_over(&self, conn: &Arc<OwnedFd>) -> std::io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(&**conn, Timeout::Recv, Some(STEP_TIMEOUT))?;
        let taken = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take();
        let detached = taken.map(|w| w.detach()).unwrap_or_default();
        if let Some(ms) = std::env::var("LB_TEST_HANDOVER_PAUSE_MS").ok().and_then(|v| v.parse().ok()) {
            // Test hook: a window in which no process watches the connections.
            log::warn!(
                "LB_TEST_HANDOVER_PAUSE_MS: pausing the hand-over {ms} ms with nothing watching (a test setting)"
            );
            std::thread::sleep(Duration::from_millis(ms));
        }
        let live = self.outbox.lock().live.clone();
        let handed: Vec<(Handed, [&TcpStream; 2])> = detached
            .iter()
            .filter_map(|d| {
                let held = live.get(&d.id)?.clone();
                Some((Handed { held, copy: d.copy.clone() }, [&d.socks[0], &d.socks[1]]))
            })
            .collect();
        let sent = (|| {
            let fds: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.as_fd()).collect();
            wire::send(&**conn, &ToWorker::Handover { version: VERSION, listeners: fds.len() }, &fds)?;
            for chunk in wire::handover_chunks(&handed, |(h, _)| h.size_hint()) {
                let fds: Vec<BorrowedFd<'_>> = chunk.iter().flat_map(|(_, s)| [s[0].as_fd(), s[1].as_fd()]).collect();
                wire::send(&**conn, &ToWorker::Conns(chunk.iter().map(|(h, _)| h.clone()).collect()), &fds)?;
            }
            wire::send(&**conn, &ToWorker::HandoverEnd, &[])?;
            match wire::recv::<ToHolder>(&**conn)? {
                Some((ToHolder::TookOver, _)) => Ok(()),
                other => Err(std::io::Error::other(format!("the new holder answered {other:?}"))),
            }
        })();
        match sent {
            Ok(()) => {
                log::info!(
                    "handed {} connection(s) and {} listener(s) to the new holder; exiting",
                    handed.len(),
                    self.listeners.len()
                );
                std::process::exit(0);
            }
            Err(e) => {
                log::error!("hand-over failed: {e}; keeping all {} connection(s)", detached.len());
                if self.pin_path.is_some() {
                    let w = self.start_watcher().map_err(std::io::Error::other)?;
                    *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
                }
                for d in detached {
                    let Some(held) = live.get(&d.id).cloned() else { continue };
                    if let Err((why, _)) = self.keep(held, d.socks, d.copy) {
                        log::error!("connection {} could not be watched again: {why}", d.id);
                    }
                }
                Err(e)
            }
        }
    }
}

/// The new side: takes everything from the holder serving at `path`;
/// returns the new holder (not bound yet) and how many connections it
/// took. On error the old holder keeps everything.
pub fn take_over(path: &Path, pin_path: Option<&Path>, conf: WatchConf) -> anyhow::Result<(Holder, usize)> {
    let sock = wire::connect(path).with_context(|| format!("connecting to the old holder at {}", path.display()))?;
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Recv, Some(STEP_TIMEOUT))?;
    wire::send(&sock, &ToHolder::Takeover { version: VERSION, pid: std::process::id() }, &[])?;
    let listeners = match wire::recv::<ToWorker>(&sock)? {
        Some((ToWorker::Handover { version: VERSION, listeners }, fds)) if fds.len() == listeners => {
            fds.into_iter().map(std::net::TcpListener::from).collect()
        }
        other => bail!("the old holder answered {other:?} (this one speaks version {VERSION})"),
    };
    let holder = Holder::new(listeners, pin_path, conf)?;
    let mut n = 0;
    loop {
        match wire::recv::<ToWorker>(&sock)? {
            Some((ToWorker::Conns(conns), fds)) => {
                if fds.len() != 2 * conns.len() {
                    bail!("{} descriptors for {} connections", fds.len(), conns.len());
                }
                let mut fds = fds.into_iter();
                for h in conns {
                    let (c, s): (OwnedFd, OwnedFd) = (fds.next().context("fd")?, fds.next().context("fd")?);
                    let id = h.held.id;
                    holder
                        .keep(h.held, [TcpStream::from(c), TcpStream::from(s)], h.copy)
                        .map_err(|(why, _)| anyhow::anyhow!("connection {id}: {why}"))?;
                    n += 1;
                }
            }
            Some((ToWorker::HandoverEnd, _)) => break,
            other => bail!("the old holder sent {other:?} during the hand-over"),
        }
    }
    wire::send(&sock, &ToHolder::TookOver, &[])?;
    Ok((holder, n))
}
