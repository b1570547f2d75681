//! Small socket calls that neither std nor socket2 offer.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, RawFd},
};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut val = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: val is valid for len bytes; the kernel writes at most len.
    check(unsafe { libc::getsockopt(fd, level, name, val.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zero-initialised and T is plain data.
    Ok(unsafe { val.assume_init() })
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: val points to size_of::<T>() readable bytes.
    check(unsafe { libc::setsockopt(fd, level, name, (val as *const T).cast(), size_of::<T>() as libc::socklen_t) })
        .map(drop)
}

/// The socket's cookie (`SO_COOKIE`), the same value `bpf_get_socket_cookie` returns.
pub fn socket_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    getsockopt::<u64>(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// Reads and clears the pending socket error (`SO_ERROR`); 0 when none.
pub fn take_error(s: &impl AsRawFd) -> io::Result<i32> {
    getsockopt::<libc::c_int>(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR)
}

/// Sets `SO_RCVLOWAT`. On TCP this also calls `tcp_data_ready()`, which runs
/// bytes already queued on the socket through a freshly attached verdict.
pub fn set_rcvlowat(s: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, &bytes)
}

/// Arms an abortive close: the next `close()` sends RST instead of FIN.
pub fn set_linger_zero(s: &impl AsRawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

/// Total bytes the application (or the kernel on its behalf) has written to
/// this TCP socket: bytes acknowledged by the peer plus bytes still queued.
/// Read in that order the sum never exceeds the true figure at return time.
pub fn tcp_bytes_written(s: &impl AsRawFd) -> io::Result<u64> {
    let fd = s.as_raw_fd();
    // Acked first: bytes acked between the two reads then move from the
    // second figure into the first unseen, instead of being counted twice.
    let info: libc::tcp_info = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) })?;
    Ok(info.tcpi_bytes_acked + outq.max(0) as u64)
}

/// Raises the soft open-files limit to the hard limit; returns (soft, hard).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        let new = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: valid pointer.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) })?;
        lim.rlim_cur = lim.rlim_max;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// A minimal epoll instance.
pub struct Epoll {
    fd: std::os::fd::OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh fd we own.
        Ok(Self { fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) } })
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid event pointer.
        check(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: the event pointer may be null for EPOLL_CTL_DEL.
        check(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) }).map(drop)
    }

    /// Waits up to `timeout_ms` (-1: forever); returns the filled events.
    pub fn wait<'a>(&self, buf: &'a mut [libc::epoll_event], timeout_ms: i32) -> io::Result<&'a [libc::epoll_event]> {
        // SAFETY: buf is valid for buf.len() events.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), buf.as_mut_ptr(), buf.len() as i32, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(&buf[..0]);
            }
            return Err(e);
        }
        Ok(&buf[..n as usize])
    }
}

/// An eventfd used to wake a thread blocked in `Epoll::wait`.
pub struct EventFd {
    fd: std::os::fd::OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fresh fd we own.
        Ok(Self { fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) } })
    }
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Bytes received in order on this TCP socket (`tcpi_bytes_received`).
pub fn tcp_bytes_received(s: &impl AsRawFd) -> io::Result<u64> {
    let info: libc::tcp_info = getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.tcpi_bytes_received)
}

/// `IP_LOCAL_PORT_RANGE` from `<linux/in.h>` (Linux 6.3).
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// `IP_BIND_ADDRESS_NO_PORT`: `bind(ip, 0)` then picks no port; `connect()`
/// picks one unique per 4-tuple, so each server gets the whole range.
pub fn set_bind_address_no_port(s: &impl AsRawFd) -> io::Result<()> {
    setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1 as &libc::c_int)
}

/// Restricts the socket's ephemeral ports to `low..=high` (`IP_LOCAL_PORT_RANGE`).
pub fn set_local_port_range(s: &impl AsRawFd, low: u16, high: u16) -> io::Result<()> {
    let v: u32 = (u32::from(high) << 16) | u32::from(low);
    setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, &v)
}

/// The hard open-files limit of this process.
pub fn nofile_hard_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok(lim.rlim_max)
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock `bpf_ktime_get_coarse_ns()` reads.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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

/// Whether this kernel has `IP_LOCAL_PORT_RANGE`.
pub fn has_local_port_range() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| set_local_port_range(&s, 1024, 65535))
        .is_ok()
}

/// What the kernel plane needs of a socket before splicing it, in one
/// `TCP_INFO` read: whether it is still `ESTABLISHED`, and the bytes it
/// counts as written so far. lb writes nothing before the splice, so the
/// send queue is empty and `tcpi_bytes_acked` (the SYN) is the whole count.
pub fn tcp_splice_state(s: &impl AsRawFd) -> io::Result<(bool, u64)> {
    let info: libc::tcp_info = getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok((info.tcpi_state == 1, info.tcpi_bytes_acked))
}
