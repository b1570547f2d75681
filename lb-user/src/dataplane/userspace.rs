//! Userspace data plane: copies bytes through lb with the same semantics as
//! the kernel splice (half-close forwarded, resets forwarded, one close).
//!
//! Each runtime thread reads into one buffer of its own and writes the bytes
//! straight on; a connection holds a copy of its bytes only while its
//! destination cannot take them all, so an idle one holds no buffer and a
//! read costs no allocation.

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};

use super::{Dataplane, Kind, SpliceError, Spliced};
use crate::{kernel::sys, observe::conn::CloseReason};

const BUF: usize = 64 * 1024;

pub struct UserspaceDataplane {
    stop: watch::Sender<bool>,
    idle: Duration,
}

impl UserspaceDataplane {
    /// `idle`: a connection with no byte either way for this long is closed.
    pub fn new(idle: Duration) -> Self {
        Self { stop: watch::channel(false).0, idle }
    }
}

/// Bytes and last activity of one direction.
struct Flow {
    bytes: AtomicU64,
    /// Milliseconds since the connection's start.
    last_ms: AtomicU64,
}

impl Flow {
    fn new() -> Self {
        Self { bytes: AtomicU64::new(0), last_ms: AtomicU64::new(0) }
    }
}

/// Resolves once neither flow moved a byte for `idle`.
async fn idle_for(start: Instant, idle: Duration, flows: [&Flow; 2]) {
    loop {
        let last = flows.iter().map(|f| f.last_ms.load(Relaxed)).max().unwrap_or(0);
        let deadline = start + Duration::from_millis(last) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

enum PumpError {
    /// Reading the source failed (it reset): reset the destination.
    Read(io::Error),
    /// Writing the destination failed (it reset): reset the source.
    Write(io::Error),
}

thread_local! {
    /// This thread's read buffer. What is read goes straight out to the
    /// destination, so a connection owns a copy of its bytes only while the
    /// destination cannot take them all.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; BUF].into_boxed_slice());
}

/// One read from the source, and what became of it.
enum Step {
    Eof,
    /// Nothing to read now.
    Empty,
    /// Read and written, this many bytes.
    Moved(usize),
    /// Read this many; the destination took only part: the rest.
    Partial(usize, Vec<u8>),
}

/// Reads once into the thread's buffer and writes what it got to `to`
/// without waiting.
fn step(from: &TcpStream, to: &TcpStream) -> Result<Step, PumpError> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = match from.try_read(buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Empty),
            Err(e) => return Err(PumpError::Read(e)),
        };
        let mut off = 0;
        while off < n {
            match to.try_write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Partial(n, buf[off..n].to_vec())),
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        Ok(Step::Moved(n))
    })
}

/// Copies `from` -> `to` until EOF, then shuts down `to`'s write side.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    flow: &Flow,
    start: Instant,
) -> Result<(), PumpError> {
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        loop {
            let n = match step(from, to)? {
                Step::Eof => {
                    // Shutdown fails only if `to` is gone; its own pump reports that.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Step::Empty => break,
                Step::Moved(n) => n,
                Step::Partial(n, rest) => {
                    let mut rest = &rest[..];
                    while !rest.is_empty() {
                        to.writable().await.map_err(PumpError::Write)?;
                        match to.try_write(rest) {
                            Ok(w) => rest = &rest[w..],
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(PumpError::Write(e)),
                        }
                    }
                    n
                }
            };
            counter.fetch_add(n as u64, Relaxed);
            flow.bytes.fetch_add(n as u64, Relaxed);
            flow.last_ms.store(start.elapsed().as_millis() as u64, Relaxed);
        }
    }
}

impl Dataplane for UserspaceDataplane {
    fn kind(&self) -> Kind {
        Kind::Userspace
    }

    fn splice(&self, conn: Spliced) -> Result<(), SpliceError> {
        let Spliced { socks, guard, .. } = conn;
        for s in [socks.client(), socks.server()] {
            s.set_nonblocking(true).map_err(SpliceError::Socket)?;
        }
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return Err(SpliceError::ShuttingDown);
        }
        // Registering with the runtime cannot fail for a socket it made;
        // if it does, the second socket is reset by this guard.
        let [client, server] = socks.take();
        let client = TcpStream::from_std(client).map_err(SpliceError::Socket)?;
        let server = match TcpStream::from_std(server) {
            Ok(s) => s,
            Err(e) => {
                let _ = sys::set_linger_zero(&client);
                return Err(SpliceError::Socket(e));
            }
        };
        let idle = self.idle;
        tokio::spawn(async move {
            let mut guard = guard;
            let stats = guard.stats();
            let start = Instant::now();
            let (flow_in, flow_out) = (Flow::new(), Flow::new());
            let up = pump(&client, &server, &stats.userspace_bytes_in, &flow_in, start);
            let down = pump(&server, &client, &stats.userspace_bytes_out, &flow_out, start);
            let both = async {
                tokio::try_join!(async { up.await.map_err(|e| (e, 0usize)) }, async {
                    down.await.map_err(|e| (e, 1usize))
                })
                .map(drop)
            };
            let mut reason = CloseReason::Fin;
            let result = tokio::select! {
                r = both => r,
                _ = stop.wait_for(|s| *s) => {
                    reason = CloseReason::Shutdown;
                    Ok(())
                }
                _ = idle_for(start, idle, [&flow_in, &flow_out]) => {
                    log::debug!("closing a connection idle for more than {idle:?}");
                    for s in [&client, &server] {
                        let _ = socket2::SockRef::from(s).shutdown(Shutdown::Both);
                    }
                    stats.idle_closed.fetch_add(1, Relaxed);
                    reason = CloseReason::Idle;
                    Ok(())
                }
            };
            if let Err((e, dir)) = result {
                // dir 0: client -> server, dir 1: server -> client. A read
                // error is the source's reset, a write error the destination's:
                // reset the other one.
                let (src, dst) = if dir == 0 { (&client, &server) } else { (&server, &client) };
                let (other, err) = match e {
                    PumpError::Read(err) => (dst, err),
                    PumpError::Write(err) => (src, err),
                };
                log::debug!("connection aborted: {err}");
                let _ = sys::set_linger_zero(other);
                stats.aborted.fetch_add(1, Relaxed);
                reason = CloseReason::Rst;
            }
            guard.set_reason(reason);
            guard.add_bytes(flow_in.bytes.load(Relaxed), flow_out.bytes.load(Relaxed));
            drop((client, server));
            drop(guard);
        });
        Ok(())
    }

    fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}
