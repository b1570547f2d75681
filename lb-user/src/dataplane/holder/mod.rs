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
//! learn when each ends); then [`wire::ToWorker::Closed`] batches as they
//! end, sent by a thread of their own ([`outbox`]).

pub mod beat;
mod handover;
pub mod link;
mod outbox;
pub mod wire;

use std::{
    net::TcpStream,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context as _;
use beat::Beat;
pub use handover::take_over;
use outbox::{Outbox, SEND_TIMEOUT};
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};
use wire::{Closed, CopyState, Held, ToHolder, VERSION};

pub use super::watcher::WatchConf;
use super::watcher::{Dir, Report, Watcher};
use crate::kernel::maps::ConnMaps;

fn open_maps(path: &Path) -> anyhow::Result<ConnMaps> {
    ConnMaps::open(path).map_err(|e| anyhow::anyhow!("opening the pinned maps at {}: {e}", path.display()))
}

/// Why a connection could not be kept, and its sockets if nothing has reset them.
type Refusal = (String, Option<[TcpStream; 2]>);

/// The watcher's closes go to the worker's queue: it never sends itself.
/// Each round of its loop is a heartbeat.
#[derive(Clone)]
struct Reporter {
    outbox: Arc<Outbox>,
    beat: Arc<OnceLock<Beat>>,
}

impl Report for Reporter {
    fn closed(&mut self, c: Closed) {
        self.outbox.closed(c);
        panic_if_asked();
    }

    fn flush(&mut self) {
        self.outbox.flush();
        if let Some(b) = self.beat.get() {
            b.tick();
        }
    }
}

/// Test hook: with `LB_TEST_PANIC_WATCHER=FILE`, the close watcher panics
/// at the first close after FILE appears (and removes it, so the holder
/// started next does not): a test of what a panicking thread does to the
/// process.
fn panic_if_asked() {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let file = FILE.get_or_init(|| std::env::var_os("LB_TEST_PANIC_WATCHER").map(PathBuf::from));
    if let Some(f) = file
        && std::fs::remove_file(f).is_ok()
    {
        panic!("LB_TEST_PANIC_WATCHER: the close watcher panics (a test setting)");
    }
}

/// The holder of one worker slot.
pub struct Holder {
    /// The connections held, and what goes to the worker.
    outbox: Arc<Outbox>,
    /// Where the watcher beats, once [`Self::beat_to`] says.
    beat: Arc<OnceLock<Beat>>,
    /// `None` on the userspace plane, and while connections are handed over.
    watcher: Mutex<Option<Watcher>>,
    /// The pinned maps, on the kernel plane.
    pin_path: Option<PathBuf>,
    /// The slot's joined connections (packet plane).
    packets: Mutex<Option<super::packets::Packets>>,
    /// This process's own handles to them, for the records of connections
    /// it refuses (the watcher's are its thread's).
    records: Option<Mutex<ConnMaps>>,
    conf: WatchConf,
    listeners: Vec<std::net::TcpListener>,
    socket: Option<OwnedFd>,
    /// A peer (a worker, or a new holder taking over) is being served.
    in_session: AtomicBool,
    /// The supervisor is gone: see [`Self::orphaned_and_done`].
    orphaned: AtomicBool,
}

impl Holder {
    /// A holder of `listeners`; with `pin_path` (the kernel plane's pinned
    /// maps) it also keeps and watches spliced connections.
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        pin_path: Option<&Path>,
        conf: WatchConf,
    ) -> anyhow::Result<Self> {
        let records = pin_path.map(open_maps).transpose()?.map(Mutex::new);
        let mut h = Self {
            outbox: Outbox::start()?,
            beat: Arc::default(),
            watcher: Mutex::new(None),
            packets: Mutex::new(None),
            pin_path: pin_path.map(Path::to_owned),
            records,
            conf,
            listeners,
            socket: None,
            in_session: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
        };
        if pin_path.is_some() {
            let w = h.start_watcher()?;
            h.watcher = Mutex::new(Some(w));
            h.start_packets()?;
        }
        Ok(h)
    }

    /// Starts tracking the slot's joined connections (packet plane), those
    /// already in the flow map included.
    fn start_packets(&self) -> anyhow::Result<()> {
        let Some(path) = self.pin_path.as_deref().filter(|_| self.conf.packet) else { return Ok(()) };
        // Its thread does not beat: the heartbeat is the close watcher's.
        let reporter = Reporter { outbox: self.outbox.clone(), beat: Arc::default() };
        let (p, found) = super::packets::Packets::start(path, self.conf.slot, self.conf.idle, reporter)
            .map_err(|e| anyhow::anyhow!("tracking the joined connections of slot {}: {e:#}", self.conf.slot))?;
        let mut st = self.outbox.lock();
        for h in found {
            st.live.insert(h.id, h);
        }
        drop(st);
        *self.packets.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    /// Stops tracking the joined connections; `remove`: and ends them.
    fn stop_packets(&self, remove: bool) {
        if let Some(p) = self.packets.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop(remove);
        }
    }

    fn start_watcher(&self) -> anyhow::Result<Watcher> {
        let path = self.pin_path.as_deref().context("no pinned maps")?;
        let maps = open_maps(path)?;
        let ring = (self.conf.queue > 0)
            .then(|| crate::kernel::maps::events_ring(path, self.conf.slot))
            .transpose()
            .map_err(|e| anyhow::anyhow!("making the flow-event ring of slot {}: {e}", self.conf.slot))?;
        Ok(Watcher::start(maps, self.conf, ring, self.reporter())?)
    }

    /// Where a watcher of this holder reports closes.
    fn reporter(&self) -> Reporter {
        Reporter { outbox: self.outbox.clone(), beat: self.beat.clone() }
    }

    /// Writes this holder's heartbeat to `path` from now on: every
    /// `every`, from the close watcher's loop, or from [`Self::tick`]
    /// where no watcher runs (the userspace plane).
    pub fn beat_to(&self, path: &Path, every: Duration) -> std::io::Result<()> {
        let _ = self.beat.set(Beat::create(path, every / 2)?);
        Ok(())
    }

    /// A heartbeat, if no watcher beats for this holder.
    pub fn tick(&self) {
        if self.pin_path.is_none()
            && let Some(b) = self.beat.get()
        {
            b.tick();
        }
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
            self.in_session.store(true, Relaxed);
            let r = self.session(&conn);
            self.in_session.store(false, Relaxed);
            match r {
                Ok(()) => log::info!("the worker left; {} connection(s) held", self.held()),
                Err(e) => log::warn!("worker connection ended: {e}; {} connection(s) held", self.held()),
            }
            self.outbox.end(&conn);
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
        let held: std::collections::HashSet<u64> = self.outbox.lock().live.values().flat_map(|h| h.cookies).collect();
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

    /// How many spliced connections this holder keeps.
    pub fn held(&self) -> usize {
        self.outbox.lock().live.len()
    }

    /// One worker, from its hello to its end.
    fn worker(&self, conn: &Arc<OwnedFd>) -> std::io::Result<()> {
        let fds: Vec<_> = self.listeners.iter().map(|l| l.as_fd()).collect();
        self.outbox.greet(conn, &fds)?;
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
                        self.outbox.refused(id);
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
        if let Some(local) = h.packet {
            return self.keep_joined(h, local);
        }
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
        self.outbox.lock().live.insert(id, h);
        watcher.watch(id, socks, cookies, written, dirs, copy).map_err(|e| {
            self.outbox.lock().live.remove(&id);
            (e.to_string(), None)
        })
    }

    /// Counts a connection joined on the packet plane: no sockets, its end
    /// comes from the program.
    fn keep_joined(&self, h: Held, local: std::net::SocketAddr) -> Result<(), String> {
        let packets = self.packets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = &*packets else { return Err("this holder tracks no joined connections".into()) };
        let ends = crate::dataplane::join::Ends { client: h.client, local, source: h.source, server: h.server };
        let t = super::packets::Tracked { id: h.id, keys: ends.keys() };
        self.outbox.lock().live.insert(h.id, h);
        p.watch(t);
        Ok(())
    }

    /// The supervisor is gone: from now on [`Self::orphaned_and_done`] says
    /// when nothing is left to keep.
    pub fn orphan(&self) {
        self.orphaned.store(true, Relaxed);
    }

    /// Orphaned, no connection left and no peer being served (a new
    /// holder taking over): the holder may end, closing its listeners.
    pub fn orphaned_and_done(&self) -> bool {
        self.orphaned.load(Relaxed) && !self.in_session.load(Relaxed) && self.held() == 0
    }

    /// Closes every connection held (the instance is stopping).
    pub fn stop(&self) {
        self.stop_packets(true);
        if let Some(w) = &*self.watcher.lock().unwrap_or_else(|e| e.into_inner()) {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests;
