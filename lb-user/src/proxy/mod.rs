//! The proxy: the life of a client connection until its bytes are handed
//! to a data plane. [`accept`] takes the client and sees it through;
//! [`connect`] picks a server (queueing while all are full) and connects to
//! it from the source pool, and writes the PROXY protocol header if the
//! backend wants one. Then both sockets go to the data plane, or lb resets
//! the client if it must give up.

pub mod accept;
pub mod connect;

use std::{sync::Arc, time::Duration};

use crate::{dataplane::Dataplane, observe::counters::Counters, servers::Backends};

/// What every connection of one process shares.
pub struct Shared {
    pub access_log: bool,
    pub backends: Arc<Backends>,
    pub dataplane: Arc<dyn Dataplane>,
    pub stats: Arc<Counters>,
    pub connect_timeout: Duration,
    pub queue_timeout: Duration,
    pub connect_attempts: u32,
    /// `send_buffer` for server sockets (client sockets inherit their listener's).
    pub send_buffer: u32,
    /// The kernel has `IP_LOCAL_PORT_RANGE`: every server socket gets the
    /// system's range as its own, which makes `connect()`'s port search
    /// sequential (see `connect::socket_for`).
    pub sequential_ports: bool,
    /// Set when a frontend joins connections on the packet plane: every
    /// server socket of this worker is bound to a port lb chooses itself,
    /// from this worker's share of the range (see [`connect::PortShare`]).
    pub own_ports: Option<connect::PortShare>,
    /// Clients accepted and not yet handed to the data plane (or given up).
    pub in_flight: std::sync::atomic::AtomicUsize,
}
