//! Per-socket connection record: identity written by userspace, traffic
//! written by the verdict program.

/// One socket of a spliced connection, keyed by its cookie in `LB_CONN`.
/// Userspace creates the entry before the socket is spliced and deletes it
/// after the connection is closed; the verdict program only updates the
/// first three fields. Addresses are IPv6 (IPv4 as `::ffff:a.b.c.d`), ports
/// in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConnTraffic {
    /// Bytes received on this socket and redirected to its peer.
    pub bytes: u64,
    /// Redirected skbs.
    pub skbs: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, coarse) of the last
    /// redirect; userspace sets it to the splice time.
    pub last_active_ns: u64,
    /// CLOCK_MONOTONIC_COARSE ns when the connection was spliced.
    pub start_ns: u64,
    /// Cookie of the other socket of the connection.
    pub peer_cookie: u64,
    /// Client address: IPv6 bytes (IPv4 as `::ffff:a.b.c.d`), network order.
    pub client_ip: [u8; 16],
    /// Server address, as `client_ip`.
    pub server_ip: [u8; 16],
    /// Local address of the server-side socket (from the source pool), as `client_ip`.
    pub source_ip: [u8; 16],
    /// Ports in host order.
    pub client_port: u16,
    pub server_port: u16,
    pub source_port: u16,
    /// Index of the lb worker process that owns the sockets.
    pub worker: u16,
    /// 0: this socket faces the client; 1: it faces the server.
    pub side: u8,
    /// The verdict reports a [`FlowEvent`] each time `bytes` crosses a
    /// multiple of `1 << event_shift`, so the holder can look at how much
    /// waits in front of the peer; 0: never (no `splice_queue_limit`).
    pub event_shift: u8,
    /// Who spliced the server side: [`SETUP_PENDING`] (written before the
    /// connect, nothing in the kernel yet), [`SETUP_KERNEL`] (the `sock_ops`
    /// program put it in at `ESTABLISHED`) or [`SETUP_FAILED`] (it tried and
    /// could not: userspace inserts everything). Only in the server's record.
    pub setup: u8,
    pub _pad0: u8,
    /// Index of the server's backend in the configuration: with the
    /// server's address, the key of its byte counters (`LB_SERVER_BYTES`).
    pub backend: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConnTraffic>() == 104);
const _: () = assert!(core::mem::offset_of!(ConnTraffic, backend) == 100);

/// What the verdict tells the holder of a connection's worker slot (through
/// that slot's ring buffer in `LB_EVENTS`): a direction has redirected
/// another `1 << event_shift` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowEvent {
    /// The connection's id in its holder: the client-facing socket's cookie.
    pub id: u64,
    /// [`ConnTraffic::bytes`] of the receiving socket after this skb.
    pub bytes: u64,
    /// [`ConnTraffic::side`] of the receiving socket (a whole word: a
    /// padding array would make the verdict zero it in a loop, which the
    /// verifier refuses without `CAP_PERFMON`).
    pub side: u64,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 24);

/// [`ConnTraffic::side`] of the client-facing socket.
pub const SIDE_CLIENT: u8 = 0;
/// [`ConnTraffic::side`] of the server-facing socket.
pub const SIDE_SERVER: u8 = 1;

/// [`ConnTraffic::setup`]: the record is written, the server not connected
/// yet (or no `sock_ops` program is attached).
pub const SETUP_PENDING: u8 = 0;
/// The `sock_ops` program made the server socket a redirect target and
/// spliced it at `ESTABLISHED` (its client had not failed to become one).
pub const SETUP_KERNEL: u8 = 1;
/// The `sock_ops` program could not do all of that: userspace inserts.
pub const SETUP_FAILED: u8 = 2;

/// Key of `LB_FRONTENDS`: a frontend's listen address. `ip` as in
/// [`ConnTraffic::client_ip`], all zeros for a wildcard address
/// (`0.0.0.0`, `::`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FrontendKey {
    pub ip: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 20);

#[cfg(feature = "user")]
crate::pod!(ConnTraffic);
#[cfg(feature = "user")]
crate::pod!(FrontendKey);
#[cfg(feature = "user")]
crate::pod!(FlowEvent);
