//! The worker's side of its holder: hands each spliced connection over,
//! counts the ones a predecessor handed over, and ends each connection's
//! [`ConnGuard`] when the holder says it closed.

use std::{
    collections::HashMap,
    net::TcpStream,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::wire::{self, Closed, Ending, Held, ToHolder, ToWorker, VERSION};
use crate::observe::conn::{CloseReason, ConnGuard};

/// How long a send to the holder may block.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// What the holder gave a worker that just connected.
pub struct Welcome {
    /// One per frontend, in config order.
    pub listeners: Vec<std::net::TcpListener>,
    /// The connections it already holds.
    pub live: Vec<Held>,
}

pub struct Link {
    sock: OwnedFd,
    /// Every connection handed to the holder, by id.
    held: Mutex<HashMap<u64, ConnGuard>>,
}

impl Link {
    /// Connects to the holder at `path`, waiting up to `within` for it to
    /// appear, and takes its welcome.
    pub fn connect(path: &Path, within: Duration) -> anyhow::Result<(Self, Welcome)> {
        let deadline = Instant::now() + within;
        // A path no socket can have is an error now, not after the wait.
        rustix::net::SocketAddrUnix::new(path).with_context(|| format!("holder socket {}", path.display()))?;
        let sock = loop {
            match wire::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    log::debug!("holder at {} not there yet: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("connecting to the holder at {}: {e}", path.display()),
            }
        };
        rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Send, Some(SEND_TIMEOUT))?;
        wire::send(&sock, &ToHolder::Hello { version: VERSION, pid: std::process::id() }, &[])?;
        let listeners = match wire::recv::<ToWorker>(&sock)? {
            Some((ToWorker::Welcome { version: VERSION, listeners }, fds)) if fds.len() == listeners => {
                fds.into_iter().map(std::net::TcpListener::from).collect()
            }
            other => bail!("the holder answered {other:?} (this worker speaks version {VERSION})"),
        };
        let mut live = Vec::new();
        loop {
            match wire::recv::<ToWorker>(&sock)? {
                Some((ToWorker::Live(l), _)) => live.extend(l),
                Some((ToWorker::LiveEnd, _)) => break,
                other => bail!("the holder sent {other:?} while listing its connections"),
            }
        }
        Ok((Self { sock, held: Mutex::new(HashMap::new()) }, Welcome { listeners, live }))
    }

    /// Counts a connection the holder already had.
    pub fn adopt(&self, id: u64, guard: ConnGuard) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, guard);
    }

    /// Hands a spliced connection to the holder and closes this process's
    /// descriptors: the message holds the sockets open until the holder
    /// has them, and the holder resets what it cannot keep (and answers
    /// [`ToWorker::Refused`]). On error nothing was handed over and the
    /// guard and sockets come back.
    pub fn hold(
        &self,
        h: Held,
        guard: ConnGuard,
        socks: [TcpStream; 2],
    ) -> Result<(), (ConnGuard, [TcpStream; 2], std::io::Error)> {
        let id = h.id;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: the holder's answer about `id` waits for the entry.
        match wire::send(&self.sock, &ToHolder::Hold(h), &[socks[0].as_fd(), socks[1].as_fd()]) {
            Ok(()) => {
                held.insert(id, guard);
                Ok(())
            }
            Err(e) => Err((guard, socks, e)),
        }
    }

    /// Tells the holder of a connection joined on the packet plane (no
    /// sockets: the kernel carries it); the holder reports its end.
    pub fn hold_joined(&self, h: Held, guard: ConnGuard) -> Result<(), (ConnGuard, std::io::Error)> {
        let id = h.id;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match wire::send(&self.sock, &ToHolder::Hold(h), &[]) {
            Ok(()) => {
                held.insert(id, guard);
                Ok(())
            }
            Err(e) => Err((guard, e)),
        }
    }

    /// Reads the holder's closes until it goes away; then every connection
    /// counted here is gone with it, and the process exits (its supervisor
    /// restarts the slot).
    pub fn run(self: Arc<Self>) {
        loop {
            match wire::recv::<ToWorker>(&self.sock) {
                Ok(Some((ToWorker::Closed(batch), _))) => self.closed(&batch),
                Ok(Some((ToWorker::Refused(ids), _))) => self.refused(&ids),
                Ok(Some((other, _))) => log::warn!("unexpected message from the holder: {other:?}"),
                Ok(None) | Err(_) => break,
            }
        }
        let lost = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        log::error!("the holder of this slot is gone, and with it {} connection(s); exiting", lost.len());
        drop(lost);
        std::process::exit(75);
    }

    /// The holder could not take these (out of descriptors) and reset
    /// them: counted as turned away for want of local resources.
    fn refused(&self, ids: &[u64]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(mut guard) = held.remove(id) {
                guard.no_local_resources();
            }
        }
    }

    fn closed(&self, batch: &[Closed]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for c in batch {
            let Some(mut g) = held.remove(&c.id) else {
                log::debug!("holder closed connection {} this worker does not count", c.id);
                continue;
            };
            g.add_bytes(c.bytes[0], c.bytes[1]);
            g.set_reason(match c.how {
                Ending::Fin => CloseReason::Fin,
                Ending::Rst => {
                    g.stats().aborted.fetch_add(1, Relaxed);
                    CloseReason::Rst
                }
                Ending::Idle => {
                    g.stats().idle_closed.fetch_add(1, Relaxed);
                    CloseReason::Idle
                }
                Ending::Shutdown => CloseReason::Shutdown,
            });
        }
    }

    /// The worker stops: its counts end here, the connections do not (the
    /// holder keeps them, for the next worker or until the instance stops).
    pub fn release_all(&self) -> usize {
        let all = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        let n = all.len();
        for (_, guard) in all {
            guard.hand_over();
        }
        n
    }
}
