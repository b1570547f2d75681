//! Everything a holder tells its worker after the welcome (closes,
//! refusals) goes through one queue and one thread, `lb-holder-send`. The
//! close watcher and the thread reading the worker's hand-overs only queue
//! (under a lock no send is ever made under), so neither waits for the
//! worker to read: a worker busy handing connections over, whose reader
//! is slow, can never stall the holder's reader in turn, which would leave
//! both sides blocked in a send to the other.
//!
//! A worker that does not take a message within [`SEND_TIMEOUT`] has its
//! session ended (the socket shut down): it exits, and the slot's next
//! worker counts what the holder still holds from its welcome. A close is
//! thus either reported to the worker that counts the connection, or that
//! worker is gone with its counts; never silently dropped while it runs.

use std::{
    collections::HashMap,
    os::fd::{BorrowedFd, OwnedFd},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

use super::wire::{self, Closed, Held, ToWorker, VERSION};

/// How long a send to a worker may block before its session is ended.
pub(super) const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// What the watcher thread, the worker's reader and the sending thread share.
#[derive(Default)]
pub(super) struct State {
    /// The worker connected now, if any.
    pub(super) worker: Option<Arc<OwnedFd>>,
    pub(super) live: HashMap<u64, Held>,
    /// Closes not yet sent to the worker.
    closed: Vec<Closed>,
    /// Connections refused, not yet told to the worker.
    refused: Vec<u64>,
}

#[derive(Default)]
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Wakes the sending thread.
    wake: Condvar,
    /// Held for every message to a worker: the welcome's list of live
    /// connections goes out before any close queued after it was taken.
    /// Lock order: `sending`, then `state` (never the other way).
    sending: Mutex<()>,
}

impl Outbox {
    /// A queue and its sending thread.
    pub(super) fn start() -> std::io::Result<Arc<Self>> {
        let outbox = Arc::new(Self::default());
        let o = outbox.clone();
        std::thread::Builder::new().name("lb-holder-send".into()).spawn(move || o.run())?;
        Ok(outbox)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `conn` the slot's worker and sends it the listeners and the
    /// connections held now; every close after that list reaches it after it.
    pub(super) fn greet(&self, conn: &Arc<OwnedFd>, listeners: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<Held> = {
            let mut st = self.lock();
            st.closed.clear();
            st.refused.clear();
            st.worker = Some(conn.clone());
            st.live.values().cloned().collect()
        };
        wire::send(&**conn, &ToWorker::Welcome { version: VERSION, listeners: listeners.len() }, listeners)?;
        wire::send_chunked(&**conn, &live, ToWorker::Live)?;
        wire::send(&**conn, &ToWorker::LiveEnd, &[])
    }

    /// `conn`'s session is over: nothing more is queued for it.
    pub(super) fn end(&self, conn: &Arc<OwnedFd>) {
        let mut st = self.lock();
        if st.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, conn)) {
            st.worker = None;
            st.closed.clear();
            st.refused.clear();
        }
    }

    /// A held connection ended: queued for the worker (sent at [`Self::flush`]).
    pub(super) fn closed(&self, c: Closed) {
        let mut st = self.lock();
        st.live.remove(&c.id);
        if st.worker.is_some() {
            st.closed.push(c);
        }
    }

    /// Wakes the sending thread if closes wait.
    pub(super) fn flush(&self) {
        if !self.lock().closed.is_empty() {
            self.wake.notify_one();
        }
    }

    /// Tells the worker (soon) that the connection `id` was not kept.
    pub(super) fn refused(&self, id: u64) {
        let mut st = self.lock();
        if st.worker.is_some() {
            st.refused.push(id);
            self.wake.notify_one();
        }
    }

    /// The sending thread: forever takes what is queued and sends it.
    fn run(&self) {
        loop {
            let (w, refused, closed) = {
                let mut st = self.lock();
                let w = loop {
                    if let Some(w) = &st.worker
                        && !(st.closed.is_empty() && st.refused.is_empty())
                    {
                        break w.clone();
                    }
                    st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                };
                (w, std::mem::take(&mut st.refused), std::mem::take(&mut st.closed))
            };
            let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            let sent = wire::send_chunked(&*w, &refused, ToWorker::Refused)
                .and_then(|()| wire::send_chunked(&*w, &closed, ToWorker::Closed));
            if let Err(e) = sent
                && self.lock().worker.as_ref().is_some_and(|c| Arc::ptr_eq(c, &w))
            {
                log::warn!(
                    "holder: telling the worker about {} closed and {} refused connection(s): {e}; ending its \
                     session (it restarts and counts the connections held again)",
                    closed.len(),
                    refused.len()
                );
                let _ = rustix::net::shutdown(&*w, rustix::net::Shutdown::Both);
            }
        }
    }
}
