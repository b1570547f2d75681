//! `lb upgrade` between two holders of one slot: the old one stops
//! watching (without closing anything) and sends the new one its listening
//! sockets and every connection with its state.
//!
//! Exactly one holder watches the connections at any time, whatever is
//! lost or late. The new one touches nothing it received until the old
//! one has let go for good:
//!
//! 1. old → new: [`ToWorker::Handover`], [`ToWorker::Conns`]…,
//!    [`ToWorker::HandoverEnd`];
//! 2. new → old: [`ToHolder::TookOver`]: it has everything (and watches
//!    nothing yet);
//! 3. old → new: [`ToWorker::HandoverCommit`], then the old one exits. It
//!    sends this only after a `TookOver`, and once it is sent (queued in
//!    the new one's socket) never watches again; on anything else (no
//!    answer within [`STEP_TIMEOUT`], an error, the send of the commit
//!    failing) it resumes, and never commits later;
//! 4. the new one watches everything only once it reads the commit. If none
//!    comes within [`STEP_TIMEOUT`], it shuts its socket for reading (from
//!    then on a commit cannot be sent: the old one's send fails and it
//!    resumes), takes a commit that came just before if there is one, and
//!    otherwise exits having touched nothing: closing its copies of the
//!    descriptors leaves the sockets to the old one.

use std::{
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustix::net::{RecvFlags, sockopt::Timeout};

use super::{
    Holder, WatchConf,
    wire::{self, Handed, ToHolder, ToWorker, VERSION},
};

/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// [`STEP_TIMEOUT`], or `LB_TEST_HANDOVER_STEP_MS` (a test hook).
fn step_timeout() -> Duration {
    std::env::var("LB_TEST_HANDOVER_STEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(STEP_TIMEOUT, Duration::from_millis)
}

/// Test hook: `LB_TEST_HANDOVER_FAULT` names a fault the old holder makes:
/// `lose-took-over` (it takes the new one's `TookOver` for lost) or
/// `late-commit` (it commits only after the new one stopped waiting).
fn fault(name: &str) -> bool {
    let on = std::env::var("LB_TEST_HANDOVER_FAULT").is_ok_and(|v| v == name);
    if on {
        log::warn!("LB_TEST_HANDOVER_FAULT: {name} (a test setting)");
    }
    on
}

impl Holder {
    /// The old side: hands everything to the new holder on `conn` and
    /// exits once it has committed; resumes watching on any failure before.
    pub(super) fn hand_over(&self, conn: &Arc<OwnedFd>) -> std::io::Result<()> {
        let step = step_timeout();
        rustix::net::sockopt::set_socket_timeout(&**conn, Timeout::Recv, Some(step))?;
        let taken = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take();
        let detached = taken.map(|w| w.detach()).unwrap_or_default();
        // Joined connections stay in the flow map, where the new holder finds them.
        self.stop_packets(false);
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
                Some((ToHolder::TookOver, _)) if fault("lose-took-over") => {
                    Err(std::io::Error::other("the new holder's answer was lost"))
                }
                Some((ToHolder::TookOver, _)) => Ok(()),
                other => Err(std::io::Error::other(format!("the new holder answered {other:?}"))),
            }?;
            if fault("late-commit") {
                std::thread::sleep(step + Duration::from_millis(500));
            }
            // The point of no return: once this is queued, the new holder watches.
            wire::send(&**conn, &ToWorker::HandoverCommit, &[])
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
                    self.start_packets().map_err(std::io::Error::other)?;
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
/// watches. On error it has touched nothing: the old holder keeps
/// everything.
pub fn take_over(path: &Path, pin_path: Option<&Path>, conf: WatchConf) -> anyhow::Result<(Holder, usize)> {
    let sock = wire::connect(path).with_context(|| format!("connecting to the old holder at {}", path.display()))?;
    rustix::net::sockopt::set_socket_timeout(&sock, Timeout::Recv, Some(step_timeout()))?;
    wire::send(&sock, &ToHolder::Takeover { version: VERSION, pid: std::process::id() }, &[])?;
    let listeners = match wire::recv::<ToWorker>(&sock)? {
        Some((ToWorker::Handover { version: VERSION, listeners }, fds)) if fds.len() == listeners => {
            fds.into_iter().map(std::net::TcpListener::from).collect()
        }
        other => bail!("the old holder answered {other:?} (this one speaks version {VERSION})"),
    };
    let holder = Holder::new(listeners, pin_path, conf)?;
    // Only received until the commit: nothing here is watched, reset or closed.
    let mut conns: Vec<(Handed, [TcpStream; 2])> = Vec::new();
    loop {
        match wire::recv::<ToWorker>(&sock)? {
            Some((ToWorker::Conns(batch), fds)) => {
                if fds.len() != 2 * batch.len() {
                    bail!("{} descriptors for {} connections", fds.len(), batch.len());
                }
                let mut fds = fds.into_iter().map(TcpStream::from);
                for h in batch {
                    let (c, s) = (fds.next().context("fd")?, fds.next().context("fd")?);
                    conns.push((h, [c, s]));
                }
            }
            Some((ToWorker::HandoverEnd, _)) => break,
            other => bail!("the old holder sent {other:?} during the hand-over"),
        }
    }
    wire::send(&sock, &ToHolder::TookOver, &[])?;
    wait_for_commit(&sock)?;
    let (all, mut n) = (conns.len(), 0);
    for (h, socks) in conns {
        let id = h.held.id;
        match holder.keep(h.held, socks, h.copy) {
            Ok(()) => n += 1,
            // Committed: the old holder is gone, so one that cannot be
            // watched is reset rather than left open and unseen.
            Err((why, socks)) => {
                for s in socks.iter().flatten() {
                    let _ = crate::kernel::sys::set_linger_zero(s);
                }
                log::error!("connection {id} taken over could not be watched: {why}");
            }
        }
    }
    if n < all {
        log::error!("{} of {all} connection(s) taken over could not be watched and were reset", all - n);
    }
    Ok((holder, n))
}

/// Waits for the old holder's commit; on a timeout, makes sure none can
/// come any more before giving up (see the module's step 4).
fn wait_for_commit(sock: &OwnedFd) -> anyhow::Result<()> {
    let why = match wire::recv::<ToWorker>(sock) {
        Ok(Some((ToWorker::HandoverCommit, _))) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            // After this no commit can be sent; one sent before is still there.
            rustix::net::shutdown(sock, rustix::net::Shutdown::Read)?;
            if let Ok(Some(r)) = wire::recv_with::<ToWorker>(sock, RecvFlags::DONTWAIT)
                && matches!(r.msg, ToWorker::HandoverCommit)
            {
                return Ok(());
            }
            format!("no commit within {:?}", step_timeout())
        }
        Ok(other) => format!("it sent {other:?}"),
        Err(e) => e.to_string(),
    };
    bail!("the old holder did not let go ({why}): it keeps everything, and this holder touched nothing")
}
