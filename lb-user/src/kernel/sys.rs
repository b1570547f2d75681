//! Socket calls that neither std, socket2 nor rustix offer: the only
//! `unsafe` system calls of lb, each with its reason.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn getsockopt<T: Copy>(s: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut val = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is valid for `len` bytes; the kernel writes at most `len`.
    check(unsafe { libc::getsockopt(s.as_raw_fd(), level, name, val.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zero-initialised, and T is plain data (an int or `tcp_info`).
    Ok(unsafe { val.assume_init() })
}

fn setsockopt<T>(s: &impl AsRawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to `size_of::<T>()` readable bytes.
    check(unsafe {
        libc::setsockopt(s.as_raw_fd(), level, name, (val as *const T).cast(), size_of::<T>() as libc::socklen_t)
    })
    .map(drop)
}

/// `bpf(cmd, attr)` for the commands aya makes no call for (batched map
/// updates and deletes, `batch.rs`; the pinned cgroup link, `link.rs`).
pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is the complete attribute for `cmd` (zero where unused);
    // any pointer in it is borrowed by the caller for the call, to memory of
    // the sizes the command reads and writes. The kernel writes back only
    // inside `attr`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// The socket's cookie (`SO_COOKIE`), the value `bpf_get_socket_cookie` returns.
pub fn socket_cookie(s: &impl AsFd) -> io::Result<u64> {
    Ok(rustix::net::sockopt::socket_cookie(s)?)
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, read
/// from a fresh socket), the value `bpf_get_netns_cookie` returns.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    getsockopt(&s, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// Sets `SO_RCVLOWAT`. On TCP this also calls `tcp_data_ready()`, which runs
/// bytes already queued on the socket through a freshly attached verdict.
pub fn set_rcvlowat(s: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &bytes)
}

/// Sets `send_buffer` (bytes; 0 leaves the kernel's autotuning) on a
/// listener, whose accepted sockets inherit it, or on a server socket:
/// `SO_SNDBUFFORCE`, past `net.core.wmem_max` (the kernel doubles it for
/// its overhead). One stream through the kernel splice stalls on a full
/// send buffer: the psock retries a jiffy later (see ARCHITECTURE.md).
/// Without `CAP_NET_ADMIN`, `SO_SNDBUF`, capped by `net.core.wmem_max`.
pub fn set_send_buffer(s: &impl AsRawFd, bytes: u32) {
    static CAPPED: std::sync::Once = std::sync::Once::new();
    let Ok(b) = libc::c_int::try_from(bytes) else { return };
    if b == 0 || setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &b).is_ok() {
        return;
    }
    if setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDBUF, &b).is_ok() {
        CAPPED.call_once(|| log::warn!("send_buffer: no CAP_NET_ADMIN, so capped at net.core.wmem_max"));
    }
}

/// A listener registered with the tokio runtime for readiness only, so
/// that accepted sockets stay unregistered (see `proxy::accept`).
pub fn async_listener(l: std::net::TcpListener) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the AsyncFd owns the listener, so its descriptor stays open
    // (and is the same descriptor) for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(l).map_err(io::Error::from) }
}

/// Arms an abortive close: the next `close()` sends RST instead of FIN.
pub fn set_linger_zero(s: &impl AsFd) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO))?)
}

fn tcp_info(s: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    getsockopt(s, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Total bytes the application (or the kernel on its behalf) has written to
/// this TCP socket: bytes acknowledged by the peer plus bytes still queued,
/// or the acknowledged bytes alone when they are `enough` already (one
/// syscall instead of two). So the figure is `>= enough` exactly when the
/// bytes written are. Read in that order the sum never exceeds the true
/// figure at return time.
pub fn tcp_bytes_written(s: &impl AsRawFd, enough: u64) -> io::Result<u64> {
    // Acked first: bytes acked between the two reads then move from the
    // second figure into the first unseen, instead of being counted twice.
    let acked = tcp_info(s)?.tcpi_bytes_acked;
    if acked >= enough {
        return Ok(acked);
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut outq) })?;
    Ok(acked + outq.max(0) as u64)
}

/// Bytes of this TCP socket the peer has acknowledged (`tcpi_bytes_acked`;
/// the SYN of a connected socket counts one).
pub fn tcp_bytes_acked(s: &impl AsRawFd) -> io::Result<u64> {
    Ok(tcp_info(s)?.tcpi_bytes_acked)
}

/// Bytes received in order on this TCP socket (`tcpi_bytes_received`).
pub fn tcp_bytes_received(s: &impl AsRawFd) -> io::Result<u64> {
    Ok(tcp_info(s)?.tcpi_bytes_received)
}

/// What the packet plane's join reads of one of lb's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinInfo {
    /// `tcpi_state` (`TCP_ESTABLISHED` is 1).
    pub state: u8,
    /// `tcpi_options`: `TCPI_OPT_*`.
    pub options: u8,
    /// Scale of the peer's windows (`tcpi_snd_wscale`), of its own
    /// (`tcpi_rcv_wscale`); 0 without window scaling.
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// The MSS it advertised.
    pub advmss: u32,
}

/// The socket's [`JoinInfo`].
pub fn join_info(s: &impl AsRawFd) -> io::Result<JoinInfo> {
    let i = tcp_info(s)?;
    let wscale = i.tcpi_snd_rcv_wscale;
    let scaled = i.tcpi_options & TCPI_OPT_WSCALE != 0;
    Ok(JoinInfo {
        state: i.tcpi_state,
        options: i.tcpi_options,
        snd_wscale: if scaled { wscale & 0x0f } else { 0 },
        rcv_wscale: if scaled { wscale >> 4 } else { 0 },
        advmss: i.tcpi_advmss,
    })
}

/// `TCP_SAVE_SYN` on a listener: each socket it accepts keeps its client's
/// SYN (headers and options) until it is read or the socket closed.
pub fn set_save_syn(l: &impl AsRawFd) -> io::Result<()> {
    setsockopt(l, libc::IPPROTO_TCP, libc::TCP_SAVE_SYN, &1 as &libc::c_int)
}

/// The socket's current TSval (`TCP_TIMESTAMP`).
pub fn tcp_timestamp(s: &impl AsRawFd) -> io::Result<u32> {
    getsockopt::<u32>(s, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)
}

/// Bytes the socket holds to send: not acknowledged yet, sent or not (`SIOCOUTQ`).
pub fn tcp_queued(s: &impl AsRawFd) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut outq) })?;
    Ok(outq.max(0) as u64)
}

/// `tcpi_options` bits.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
pub const TCPI_OPT_USEC_TS: u8 = 64;

/// Repair mode on (`CAP_NET_ADMIN`): a socket closed in repair mode sends
/// nothing, neither FIN nor RST, and the peer keeps its connection.
pub fn set_repair(s: &impl AsRawFd, on: bool) -> io::Result<()> {
    let v: libc::c_int = i32::from(on);
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_REPAIR, &v)
}

/// Aborts the socket's connection as a close with `SO_LINGER` 0 would
/// (`tcp_disconnect`: a reset to the peer, in the states that need one)
/// and keeps the descriptor, now unconnected.
pub fn disconnect(s: &impl AsFd) -> io::Result<()> {
    Ok(rustix::net::connect_unspec(s)?)
}

/// Makes `server` (not connected yet) look to its peer like `client`'s
/// peer looks to lb, as far as windows go, so that once the two
/// connections are joined the server reads the client's windows as they
/// were meant:
///
/// - the same window scale: otherwise a client that scales less (a small
///   receive buffer: scale 0) would have its windows rounded to lb's unit
///   (1 KiB at scale 10);
/// - for a client that does not scale, no larger a window than the
///   client's: a sender caps its segments at half the largest window it
///   has seen (`tcp_bound_to_half_wnd`) and sends less than a segment
///   only on its persist timer, so a server that once saw lb's 64 KiB
///   would send a client with a 4 KiB window one small segment every
///   200 ms.
///
/// Both follow `TCP_WINDOW_CLAMP` set before the connect: the scale is the
/// log2 of the clamp less 15 (`tcp_select_initial_window`), and the window
/// never exceeds it. It binds only lb's socket, which is closed at the join.
pub fn match_window_scale(client: &impl AsRawFd, server: &impl AsRawFd) -> io::Result<()> {
    let info = tcp_info(client)?;
    let scale = if info.tcpi_options & TCPI_OPT_WSCALE != 0 { info.tcpi_snd_rcv_wscale & 0x0f } else { 0 };
    let window = info.tcpi_snd_wnd.max(1024);
    let clamp: u32 = match scale {
        0 => window.min(0xffff),
        // lb's own scale is at most 14: a larger one needs no clamp.
        15.. => return Ok(()),
        s => window.max(1 << (u32::from(s) + 15)).min((1 << (u32::from(s) + 16)) - 1),
    };
    setsockopt(server, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, &(clamp as libc::c_int))
}

/// A TCP socket's progress for the packet plane's hand-over: its state
/// (`TCP_ESTABLISHED` is 1), bytes received in order (a FIN counts one) and
/// bytes the peer acknowledged (a connected socket's SYN counts one).
pub fn tcp_progress(s: &impl AsRawFd) -> io::Result<(u8, u64, u64)> {
    let i = tcp_info(s)?;
    Ok((i.tcpi_state, i.tcpi_bytes_received, i.tcpi_bytes_acked))
}

/// `IP_LOCAL_PORT_RANGE` from `<linux/in.h>` (Linux 6.3).
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// `IP_BIND_ADDRESS_NO_PORT`: `bind(ip, 0)` then picks no port; `connect()`
/// picks one unique per 4-tuple, so each server gets the whole range.
pub fn set_bind_address_no_port(s: &impl AsRawFd) -> io::Result<()> {
    setsockopt(s, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1 as &libc::c_int)
}

/// Restricts the socket's ephemeral ports to `low..=high` (`IP_LOCAL_PORT_RANGE`).
pub fn set_local_port_range(s: &impl AsRawFd, low: u16, high: u16) -> io::Result<()> {
    let v: u32 = (u32::from(high) << 16) | u32::from(low);
    setsockopt(s, libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, &v)
}

/// Whether this kernel has `IP_LOCAL_PORT_RANGE`.
pub fn has_local_port_range() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| set_local_port_range(&s, 1024, 65535))
        .is_ok()
}

/// Whether `ip` is an address of this host (in this network namespace):
/// binding a socket to it succeeds.
pub fn is_local_address(ip: std::net::IpAddr) -> io::Result<bool> {
    let domain = if ip.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    set_bind_address_no_port(&s)?;
    match s.bind(&std::net::SocketAddr::new(ip, 0).into()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Raises the soft open-files limit to the hard limit; returns (soft, hard).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if lim.current.unwrap_or(u64::MAX) < hard {
        setrlimit(Resource::Nofile, Rlimit { current: lim.maximum, maximum: lim.maximum })?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok((now.current.unwrap_or(u64::MAX), hard))
}

/// The hard open-files limit of this process.
pub fn nofile_hard_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(u64::MAX)
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock `bpf_ktime_get_coarse_ns()` reads.
/// CLOCK_MONOTONIC in milliseconds, as the kernel's TCP clock counts them
/// (`tcp_clock_ms`), truncated to 32 bits like a TSval.
pub fn monotonic_ms() -> u32 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ((t.tv_sec as u64).wrapping_mul(1000).wrapping_add(t.tv_nsec as u64 / 1_000_000)) as u32
}

pub fn monotonic_coarse_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The index of network interface `name` in this namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let s = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::DGRAM, None).ok()?;
    rustix::net::netdevice::name_to_index(&s, name).ok().filter(|i| *i != 0)
}

/// The names of this network namespace's interfaces (`/proc/self/net/dev`,
/// which shows the namespace of the process that reads it).
pub fn interfaces() -> io::Result<Vec<String>> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")?;
    // Two header lines, then `name: counters...` per interface.
    Ok(dev.lines().skip(2).filter_map(|l| Some(l.split_once(':')?.0.trim().to_owned())).collect())
}
