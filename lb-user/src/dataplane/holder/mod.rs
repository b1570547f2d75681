//! The holder: the process that keeps a worker's spliced connections.
//!
//! Each worker slot has one holder. It binds the frontends (and hands the
//! listening sockets to every worker started in the slot, so a worker that
//! dies leaves its clients waiting in the backlog instead of refused),
//! takes each connection the worker splices ([`wire::ToHolder::Hold`],
//! both sockets in `SCM_RIGHTS`), and runs the close [`Watcher`] on them.
//! The kernel splices for as long as a process holds the sockets, so a
//! worker can crash or be killed without a spliced connection noticing.
//! The holder parses no client input, no configuration and checks no
//! server: what is left to go wrong in it is little.
//!
//! A worker that starts in the slot says [`wire::ToHolder::Hello`] and gets
//! the listeners and the list of connections held (to count them, and to
//! learn when each ends); then [`wire::ToWorker::Closed`] batches as they end.

mod handover;
pub mod link;
pub mod wire;

use std::{
    collections::HashMap,
    net::TcpStream,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;

pub use handover::take_over;
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};
use wire::{Closed, CopyState, Held, ToHolder, ToWorker, VERSION};

pub use super::watcher::WatchConf;
use super::watcher::{Dir, Report, Watcher};
use crate::kernel::maps::ConnMaps;

fn open_maps(path: &Path) -> anyhow::Result<ConnMaps> {
    ConnMaps::open(path).map_err(|e| anyhow::anyhow!("opening the pinned maps at {}: {e}", path.display()))
}

/// Why a connection could not be kept, and its sockets if nothing has reset them.
type Refusal = (String, Option<[TcpStream; 2]>);

/// How long a send to a worker may block before the worker is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// What the watcher thread and the worker connection share.
#[derive(Default)]
struct State {
    /// The worker connected now, if any.
    worker: Option<Arc<OwnedFd>>,
    live: HashMap<u64, Held>,
    /// Closes not yet sent to the worker.
    closed: Vec<Closed>,
}

#[derive(Clone)]
struct Reporter(Arc<Mutex<State>>);

impl Report for Reporter {
    fn closed(&mut self, c: Closed) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.live.remove(&c.id);
        if st.worker.is_some() {
            st.closed.push(c);
        }
    }

    fn flush(&mut self) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut st.closed);
        let Some(w) = st.worker.clone() else { return };
        if let Err(e) = wire::send_chunked(&*w, &batch, ToWorker::Closed) {
            log::warn!("telling the worker about {} closed connection(s): {e}; dropping it", batch.len());
            st.worker = None;
        }
    }
}

/// The holder of one worker slot.
pub struct Holder {
    state: Arc<Mutex<State>>,
    /// `None` on the userspace plane, and while connections are handed over.
    watcher: Mutex<Option<Watcher>>,
    /// The pinned maps, on the kernel plane.
    pin_path: Option<PathBuf>,
    /// This process's own handles to them, for the records of connections
    /// it refuses (the watcher's are its thread's).
    records: Option<Mutex<ConnMaps>>,
    conf: WatchConf,
    listeners: Vec<std::net::TcpListener>,
    socket: Option<OwnedFd>,
}

impl Holder {
    /// A holder of `listeners`; with `pin_path` (the kernel plane's pinned
    /// maps) it also keeps and watches spliced connections.
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        pin_path: Option<&Path>,
        conf: WatchConf,
    ) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let records = pin_path.map(open_maps).transpose()?.map(Mutex::new);
        let mut h = Self {
            state,
            watcher: Mutex::new(None),
            pin_path: pin_path.map(Path::to_owned),
            records,
            conf,
            listeners,
            socket: None,
        };
        if pin_path.is_some() {
            let w = h.start_watcher()?;
            h.watcher = Mutex::new(Some(w));
        }
        Ok(h)
    }

    fn start_watcher(&self) -> anyhow::Result<Watcher> {
        let path = self.pin_path.as_deref().context("no pinned maps")?;
        let maps = open_maps(path)?;
        let ring = (self.conf.queue > 0)
            .then(|| crate::kernel::maps::events_ring(path, self.conf.slot))
            .transpose()
            .map_err(|e| anyhow::anyhow!("making the flow-event ring of slot {}: {e}", self.conf.slot))?;
        Ok(Watcher::start(maps, self.conf, ring, Reporter(self.state.clone()))?)
    }

    /// Binds the socket at `path` (mode 0600) where the slot's workers find it.
    pub fn bind(&mut self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let socket = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = rustix::net::bind(&socket, &SocketAddrUnix::new(path)?);
        rustix::process::umask(old);
        bound?;
        rustix::net::listen(&socket, 4)?;
        self.socket = Some(socket);
        Ok(())
    }

    /// Serves the slot's workers, one at a time, until the process ends
    /// (or a holder of a new binary takes everything over).
    pub fn serve(&self) {
        let Some(socket) = &self.socket else { return };
        loop {
            let conn = match rustix::net::accept_with(socket, SocketFlags::CLOEXEC) {
                Ok(c) => Arc::new(c),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    log::error!("holder: accepting a worker: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(e) = rustix::net::sockopt::set_socket_timeout(
                &*conn,
                rustix::net::sockopt::Timeout::Send,
                Some(SEND_TIMEOUT),
            ) {
                log::warn!("holder: send timeout: {e}");
            }
            match self.session(&conn) {
                Ok(()) => log::info!("the worker left; {} connection(s) held", self.held()),
                Err(e) => log::warn!("worker connection ended: {e}; {} connection(s) held", self.held()),
            }
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, &conn)) {
                st.worker = None;
                st.closed.clear();
            }
        }
    }

    /// Removes the records the slot's worker wrote and no longer needs,
    /// once it is gone (its connection here ended: it died or stopped):
    /// those of connections it was setting up (written before the connect,
    /// or before the splice) and never handed here. No worker of the slot
    /// runs meanwhile (the next one is served only after this, and a worker
    /// whose connection here broke exits), so every record of the slot not
    /// held here is such a one.
    fn sweep(&self) {
        let Some(m) = &self.records else { return };
        let held: std::collections::HashSet<u64> = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.live.values().flat_map(|h| h.cookies).collect()
        };
        let n = m.lock().unwrap_or_else(|e| e.into_inner()).forget_worker(self.conf.slot, &held);
        if n > 0 {
            log::info!("removed {n} connection record(s) the worker left (connections it was setting up)");
        }
    }

    /// One peer: a worker of the slot, or a new holder taking over.
    fn session(&self, conn: &Arc<OwnedFd>) -> std::io::Result<()> {
        match wire::recv::<ToHolder>(&**conn)? {
            Some((ToHolder::Hello { version: VERSION, pid }, _)) => {
                log::info!("worker pid {pid} connected");
                let r = self.worker(conn);
                self.sweep();
                r
            }
            Some((ToHolder::Takeover { version: VERSION, pid }, _)) => {
                log::info!("holder pid {pid} of a new binary takes over");
                self.hand_over(conn)
            }
            Some((ToHolder::Hello { version, .. } | ToHolder::Takeover { version, .. }, _)) => {
                Err(std::io::Error::other(format!("peer speaks version {version}, this holder {VERSION}")))
            }
            other => Err(std::io::Error::other(format!("expected a hello, got {other:?}"))),
        }
    }

    fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live.len()
    }

    /// One worker, from its hello to its end.
    fn worker(&self, conn: &Arc<OwnedFd>) -> std::io::Result<()> {
        {
            // Under the lock: every close after this snapshot reaches the worker after it.
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let fds: Vec<_> = self.listeners.iter().map(|l| l.as_fd()).collect();
            wire::send(&**conn, &ToWorker::Welcome { version: VERSION, listeners: fds.len() }, &fds)?;
            let live: Vec<Held> = st.live.values().cloned().collect();
            wire::send_chunked(&**conn, &live, ToWorker::Live)?;
            wire::send(&**conn, &ToWorker::LiveEnd, &[])?;
            st.closed.clear();
            st.worker = Some(conn.clone());
        }
        let mut refusals = crate::observe::Every::new();
        loop {
            let Some(r) = wire::recv_with::<ToHolder>(&**conn, RecvFlags::empty())? else { return Ok(()) };
            match r.msg {
                ToHolder::Hold(h) => {
                    let id = h.id;
                    if let Err(why) = self.hold(h, r.fds, r.fds_lost) {
                        if let Some(n) = refusals.hit() {
                            log::warn!("holder: cannot take {n} connection(s): {why}; turned away");
                        }
                        wire::send(&**conn, &ToWorker::Refused(vec![id]), &[])?;
                    }
                }
                other => return Err(std::io::Error::other(format!("unexpected from a worker: {other:?}"))),
            }
        }
    }

    /// Takes one connection, or resets it and says why not. The worker has
    /// closed its own descriptors already, so what this holder cannot keep
    /// it resets here (and removes the connection's records). Descriptors
    /// the kernel could not install here (`fds_lost`: this process is out
    /// of descriptors) it closed itself: such a socket ends with a FIN.
    fn hold(&self, h: Held, fds: Vec<OwnedFd>, fds_lost: bool) -> Result<(), String> {
        let cookies = h.cookies;
        let socks: Vec<TcpStream> = fds.into_iter().map(TcpStream::from).collect();
        let (why, left) = if fds_lost {
            ("out of descriptors".to_string(), socks)
        } else {
            match <[TcpStream; 2]>::try_from(socks) {
                Ok(socks) => match self.keep(h, socks, None) {
                    Ok(()) => return Ok(()),
                    Err((why, socks)) => (why, socks.map(Vec::from).unwrap_or_default()),
                },
                Err(socks) => (format!("{} descriptors instead of two", socks.len()), socks),
            }
        };
        for s in &left {
            let _ = crate::kernel::sys::set_linger_zero(s);
        }
        if let Some(m) = &self.records {
            m.lock().unwrap_or_else(|e| e.into_inner()).forget_closing(&cookies);
        }
        Err(why)
    }

    /// Watches a connection from here on. On error the sockets come back
    /// if the watcher never had them (it resets those it had).
    fn keep(&self, h: Held, socks: [TcpStream; 2], copy: Option<CopyState>) -> Result<(), Refusal> {
        let watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        let Some(watcher) = &*watcher else {
            return Err(("this holder keeps no connections (userspace data plane)".into(), Some(socks)));
        };
        let id = h.id;
        if id >= 1 << 63 {
            return Err(("id out of range".into(), Some(socks)));
        }
        let dirs = [if h.client_copied { Dir::User } else { Dir::Kernel }, Dir::Kernel];
        let (cookies, written) = (h.cookies, h.written_base);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live.insert(id, h);
        watcher.watch(id, socks, cookies, written, dirs, copy).map_err(|e| {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).live.remove(&id);
            (e.to_string(), None)
        })
    }

    /// Closes every connection held (the instance is stopping).
    pub fn stop(&self) {
        if let Some(w) = &*self.watcher.lock().unwrap_or_else(|e| e.into_inner()) {
            w.stop();
        }
    }
}
