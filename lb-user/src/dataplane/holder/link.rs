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
    /// sockets come back, with the guard (unless [`Self::release_all`]
    /// took it meanwhile).
    pub fn hold(
        &self,
        h: Held,
        guard: ConnGuard,
        socks: [TcpStream; 2],
    ) -> Result<(), (Option<ConnGuard>, [TcpStream; 2], std::io::Error)> {
        let id = h.id;
        // Counted before the send, so the holder's answer about `id` finds
        // it; but the lock is not held across the send, which may block
        // until the holder reads: the thread reading the holder's answers
        // takes it, and the holder may itself be waiting for that thread.
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, guard);
        match wire::send(&self.sock, &ToHolder::Hold(h), &[socks[0].as_fd(), socks[1].as_fd()]) {
            Ok(()) => Ok(()),
            // Not sent: the holder never heard of `id`, so nothing else took the entry.
            Err(e) => Err((self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&id), socks, e)),
        }
    }

    /// Tells the holder of a connection joined on the packet plane (no
    /// sockets: the kernel carries it); the holder reports its end.
    pub fn hold_joined(&self, h: Held, guard: ConnGuard) -> Result<(), (Option<ConnGuard>, std::io::Error)> {
        let id = h.id;
        // As in `hold`: counted first, the lock not held across the send.
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, guard);
        match wire::send(&self.sock, &ToHolder::Hold(h), &[]) {
            Ok(()) => Ok(()),
            Err(e) => Err((self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&id), e)),
        }
    }

    /// Reads the holder's closes until the link ends: the holder is gone
    /// (and the connections with it), or it ended this worker's session
    /// because this worker did not take its messages. Either way the
    /// process exits; the supervisor restarts it, and the new worker counts
    /// what the holder (restarted, if it died) still holds.
    pub fn run(self: Arc<Self>) {
        self.read();
        let lost = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        log::error!(
            "the link to this slot's holder ended (the holder is gone, or it ended this worker's session); {} \
             connection(s) counted here are counted again by the next worker if the holder still has them; exiting",
            lost.len()
        );
        drop(lost);
        std::process::exit(75);
    }

    /// Takes the holder's answers until the link ends.
    fn read(&self) {
        loop {
            match wire::recv::<ToWorker>(&self.sock) {
                Ok(Some((ToWorker::Closed(batch), _))) => self.closed(&batch),
                Ok(Some((ToWorker::Refused(ids), _))) => self.refused(&ids),
                Ok(Some((other, _))) => log::warn!("unexpected message from the holder: {other:?}"),
                Ok(None) | Err(_) => return,
            }
        }
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

#[cfg(test)]
mod tests {
    use std::{
        net::TcpStream,
        os::fd::OwnedFd,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        },
        time::{Duration, Instant},
    };

    use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType, sockopt};
    use tokio::sync::Semaphore;

    use super::{Link, SEND_TIMEOUT};
    use crate::{
        dataplane::holder::wire::{self, Closed, Ending, Held, ToHolder, ToWorker},
        observe::{conn::ConnGuard, counters::Counters},
    };

    fn held(id: u64) -> Held {
        let a = "127.0.0.1:1".parse().unwrap();
        Held {
            id,
            cookies: [id, id + 1],
            written_base: [0; 2],
            client_copied: false,
            frontend: 0,
            backend: 0,
            client: a,
            source: a,
            server: a,
            start_ns: 0,
            packet: None,
        }
    }

    /// Stand-ins for a connection's two sockets: only their descriptors travel.
    fn socks() -> [TcpStream; 2] {
        let f = || TcpStream::from(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        [f(), f()]
    }

    /// A hand-over blocked in its send (the holder's queue is full) does
    /// not hold up the holder's closes: the close of a connection handed
    /// over earlier ends its guard at once, and its maxconn permit comes
    /// back, instead of after the send gives up.
    #[test]
    fn a_close_is_counted_while_a_hand_over_waits_for_the_holder() {
        let (worker_end, holder_end) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        sockopt::set_socket_send_buffer_size(&worker_end, 32 * 1024).unwrap();
        sockopt::set_socket_timeout(&worker_end, sockopt::Timeout::Send, Some(SEND_TIMEOUT)).unwrap();
        let link = Arc::new(Link { sock: worker_end, held: Default::default() });
        let l = link.clone();
        std::thread::spawn(move || l.read());
        let stats = Arc::new(Counters::default());
        let maxconn = Arc::new(Semaphore::new(1000));
        let (handed, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (l, s, m, h, st) = (link.clone(), stats.clone(), maxconn.clone(), handed.clone(), stop.clone());
        // Hands connections over until a send blocks: the holder reads nothing.
        let hands = std::thread::spawn(move || {
            for id in 1u64.. {
                if st.load(Relaxed) {
                    return;
                }
                let permit = m.clone().try_acquire_owned().ok();
                let guard = ConnGuard::new(s.clone(), [permit, None], "127.0.0.1:2".parse().unwrap(), false);
                if l.hold(held(id), guard, socks()).is_ok() {
                    h.store(id, Relaxed);
                }
            }
        });
        // Blocked: no hand-over for 200 ms.
        let mut seen = (0, Instant::now());
        while seen.1.elapsed() < Duration::from_millis(200) {
            let now = handed.load(Relaxed);
            if now != seen.0 {
                seen = (now, Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(seen.0 > 1, "no hand-over went through before the queue filled");
        let (active, free) = (stats.active.load(Relaxed), maxconn.available_permits());
        let t0 = Instant::now();
        let close = Closed { id: 1, bytes: [0; 2], how: Ending::Fin };
        wire::send(&holder_end, &ToWorker::Closed(vec![close]), &[]).unwrap();
        while stats.active.load(Relaxed) == active && t0.elapsed() < 2 * SEND_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = t0.elapsed();
        stop.store(true, Relaxed);
        // Let the blocked hand-over through, and the thread end.
        while !hands.is_finished() {
            while let Ok(Some(r)) = wire::recv_with::<ToHolder>(&holder_end, RecvFlags::DONTWAIT) {
                drop(r.fds);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(took < Duration::from_millis(500), "the close waited {took:?} for a hand-over to the holder");
        assert_eq!(stats.active.load(Relaxed), active - 1);
        assert_eq!(maxconn.available_permits(), free + 1, "the closed connection's maxconn permit");
    }
}
