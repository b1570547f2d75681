//! The life of one connection as the counters and the access log see it:
//! a [`ConnGuard`] is made when a client is accepted and dropped when the
//! connection has ended, wherever that is (the proxy for a rejected client,
//! a data plane for a spliced or copied one).

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Instant,
};

use tokio::sync::OwnedSemaphorePermit;

use super::counters::Counters;
use crate::servers::server::{PairState, ServerState};

/// Why a connection ended (the access log's `close=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed normally.
    Fin,
    /// One side reset; the other got a reset.
    Rst,
    /// `timeouts.idle` passed.
    Idle,
    /// lb was stopping.
    Shutdown,
    /// No server: none up, no source port, queue full or timed out, unreachable.
    Rejected(&'static str),
    /// Setting the connection up failed.
    Error,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fin => f.write_str("fin"),
            Self::Rst => f.write_str("rst"),
            Self::Idle => f.write_str("idle"),
            Self::Shutdown => f.write_str("shutdown"),
            Self::Rejected(why) => write!(f, "rejected:{why}"),
            Self::Error => f.write_str("error"),
        }
    }
}

/// Who and what, for the access log.
#[derive(Debug)]
struct AccessInfo {
    client: std::net::SocketAddr,
    source: Option<std::net::SocketAddr>,
    start: Instant,
    bytes: [u64; 2],
    reason: CloseReason,
}

/// Counts one live connection; dropping it marks the connection closed and
/// frees its server slot, source port and limit permits, and writes the
/// access-log line.
#[derive(Debug)]
pub struct ConnGuard {
    stats: Arc<Counters>,
    server: Option<(Arc<ServerState>, Arc<PairState>)>,
    _permits: [Option<OwnedSemaphorePermit>; 2],
    /// Boxed: a connection without an access log carries 8 bytes, not ~120.
    access: Option<Box<AccessInfo>>,
    /// See [`Self::hand_over`].
    handed_over: bool,
    /// The source port of a connection joined on the packet plane, booked
    /// in its pair until the connection ends.
    joined_port: Option<u16>,
    /// Directions (client -> server, server -> client) whose bytes the
    /// kernel counts per server itself (`LB_SERVER_BYTES`).
    kernel_counted: [bool; 2],
}

impl ConnGuard {
    /// `access_log`: write one line when the connection ends.
    pub fn new(
        stats: Arc<Counters>,
        permits: [Option<OwnedSemaphorePermit>; 2],
        client: std::net::SocketAddr,
        access_log: bool,
    ) -> Self {
        stats.active.fetch_add(1, Relaxed);
        let access = access_log.then(|| {
            Box::new(AccessInfo {
                client,
                source: None,
                start: Instant::now(),
                bytes: [0; 2],
                reason: CloseReason::Error,
            })
        });
        Self {
            stats,
            server: None,
            _permits: permits,
            access,
            handed_over: false,
            joined_port: None,
            kernel_counted: [false; 2],
        }
    }
    /// Records why the connection ends (the last call wins).
    pub fn set_reason(&mut self, r: CloseReason) {
        if let Some(a) = &mut self.access {
            a.reason = r;
        }
    }
    /// The local address of the server-side socket.
    pub fn set_source(&mut self, source: std::net::SocketAddr) {
        if let Some(a) = &mut self.access {
            a.source = Some(source);
        }
    }
    pub fn stats(&self) -> &Counters {
        &self.stats
    }
    /// The connection now holds a slot of `server` and a port of `pair`
    /// (both already counted when they were reserved).
    pub fn connected(&mut self, server: Arc<ServerState>, pair: Arc<PairState>) {
        server.total.fetch_add(1, Relaxed);
        pair.connects.fetch_add(1, Relaxed);
        self.server = Some((server, pair));
    }
    /// The connection was joined on the packet plane: its source `port`
    /// stays booked in its pair until it ends, and `close` (lb's sockets
    /// of it) runs under the pair's port book, so that no connect can take
    /// the port between the close and the booking (see `proxy::connect`).
    pub fn joined(&mut self, port: u16, close: impl FnOnce()) {
        match &self.server {
            Some((_, p)) => {
                let mut book = p.ports.lock().unwrap_or_else(|e| e.into_inner());
                book.join(port);
                close();
                self.joined_port = Some(port);
            }
            None => close(),
        }
    }
    /// Bytes moved by a connection (client->server, server->client): the
    /// data plane's figures as it ends, and lb's own header before them.
    /// The server's counters get those of the directions the kernel does
    /// not count itself ([`Self::kernel_counted`]).
    pub fn add_bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        if let Some(a) = &mut self.access {
            a.bytes[0] += bytes_in;
            a.bytes[1] += bytes_out;
        }
        if let Some((s, _)) = &self.server {
            let [k_in, k_out] = self.kernel_counted;
            s.bytes_in.fetch_add(if k_in { 0 } else { bytes_in }, Relaxed);
            s.bytes_out.fetch_add(if k_out { 0 } else { bytes_out }, Relaxed);
        }
    }

    /// From here on, the kernel counts these directions' bytes per server
    /// as they move (a spliced side): their end figures go only to the
    /// access log.
    pub fn kernel_counted(&mut self, dirs: [bool; 2]) {
        self.kernel_counted = dirs;
    }
}

impl ConnGuard {
    /// A connection a holder kept from an earlier worker: counted live
    /// again here, on `server`'s slot and `pair`'s port (both taken even
    /// above their limits: the connection exists), without counting it
    /// accepted or connected a second time.
    pub fn adopted(
        stats: Arc<Counters>,
        permits: [Option<OwnedSemaphorePermit>; 2],
        client: std::net::SocketAddr,
        access_log: bool,
        age: std::time::Duration,
        server: Option<(Arc<ServerState>, Arc<PairState>)>,
    ) -> Self {
        let mut g = Self::new(stats, permits, client, access_log);
        if let Some(a) = &mut g.access {
            a.start = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        }
        if let Some((s, p)) = &server {
            s.active.fetch_add(1, Relaxed);
            p.in_use.fetch_add(1, Relaxed);
        }
        g.server = server;
        g
    }

    /// lb had no room for this connection after all (out of descriptors
    /// or memory): counted as rejected for `local_resources`.
    pub fn no_local_resources(&mut self) {
        self.stats.rejected.fetch_add(1, Relaxed);
        self.stats.no_local_resources.fetch_add(1, Relaxed);
        self.set_reason(CloseReason::Rejected("local_resources"));
    }

    /// This process stops counting a connection that goes on (another
    /// process will adopt it): slots and permits are freed, no close is
    /// counted and no access-log line written.
    pub fn hand_over(mut self) {
        self.access = None;
        self.handed_over = true;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(a) = &self.access {
            let server = self.server.as_ref().map_or_else(|| "-".to_owned(), |(s, _)| s.cfg.addr.to_string());
            let source = a.source.map_or_else(|| "-".to_owned(), |s| s.to_string());
            log::info!(
                target: "lb::access",
                "client={} server={server} source={source} duration={:.3}s bytes_in={} bytes_out={} close={}",
                a.client,
                a.start.elapsed().as_secs_f64(),
                a.bytes[0],
                a.bytes[1],
                a.reason
            );
        }
        if let Some((server, pair)) = self.server.take() {
            if let Some(port) = self.joined_port {
                pair.ports.lock().unwrap_or_else(|e| e.into_inner()).release(port);
            }
            pair.release();
            server.release();
        }
        self.stats.active.fetch_sub(1, Relaxed);
        if !self.handed_over {
            self.stats.closed.fetch_add(1, Relaxed);
        }
    }
}
