//! One spliced connection as the close watcher sees it: what each side's
//! bytes do (the kernel redirects them, or the watcher copies them), the
//! FIN and reset forwarding, and when the connection is over.

use std::{
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use rustix::event::epoll::EventFlags;

use crate::kernel::{maps::ConnMaps, sys};

/// A half-closed direction whose peer accepts no bytes for this long is reset.
const DRAIN_STALL: Duration = Duration::from_secs(60);
/// Bounds of the gap between two looks at a direction still draining: it
/// doubles while the peer takes nothing, and follows the rate at which it
/// takes bytes otherwise. A slow reader then costs a few looks a second,
/// not a thousand, and its FIN comes at most the longest gap late.
const DRAIN_GAP: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(100));
pub(super) const CLIENT: usize = 0;
/// Buffer of a direction copied in userspace.
pub(super) const COPY_BUF: usize = 64 * 1024;

pub(super) struct Drain {
    last_written: u64,
    last_progress: Instant,
    /// When the last look was, and when the next is due.
    looked: Instant,
    next: Instant,
}

impl Drain {
    fn new(now: Instant) -> Self {
        Self { last_written: 0, last_progress: now, looked: now, next: now }
    }

    /// Schedules the next look after one that found `written` of
    /// `received` bytes out.
    fn reschedule(&mut self, now: Instant, written: u64, received: u64) {
        let gap = if written > self.last_written {
            // When the rest is out at the rate of the last gap.
            let rate = (written - self.last_written) as f64 / now.duration_since(self.looked).as_secs_f64().max(1e-6);
            Duration::from_secs_f64(received.saturating_sub(written) as f64 / rate)
        } else {
            self.next.saturating_duration_since(self.looked) * 2
        };
        self.looked = now;
        self.next = now + gap.clamp(DRAIN_GAP.0, DRAIN_GAP.1);
    }
}

/// How the bytes one side receives reach the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The eBPF verdict redirects them.
    Kernel,
    /// The watcher reads and writes them (the side could not be spliced).
    User,
}

/// A direction copied by the watcher: non-blocking reads from the source,
/// writes to the destination, both driven by edge-triggered epoll events.
pub(super) struct Copy {
    pub buf: Box<[u8]>,
    pub len: usize,
    pub off: usize,
    pub eof: bool,
    /// The end was a reset, not a FIN: once every byte is written, the peer
    /// is reset instead of shut.
    pub reset: bool,
    pub bytes: u64,
    /// `CLOCK_MONOTONIC_COARSE` ns of the last byte read.
    pub last_ns: u64,
}

pub(super) enum Flow {
    /// Kernel splice; a pending EOF forward once the source sent its FIN.
    Kernel(Option<Drain>),
    /// The source was reset after sending this many bytes: once the peer
    /// has acknowledged all of them, it is reset too. Resetting it at once
    /// would throw away what still waits in its psock queue or send queue
    /// (a reply a server wrote right before its reset).
    Reset(u64, Drain),
    /// Kernel splice finished: the source's FIN is forwarded after all of
    /// the bytes the kernel redirected from it (the count, final now).
    Done(u64),
    User(Box<Copy>),
    /// Copy finished: every byte and the FIN went on (the count). Its
    /// buffer is freed: a client that half-closes at once and then reads a
    /// long download would otherwise keep 64 KiB in the holder for it.
    Copied(u64),
}

pub(super) struct Conn {
    /// `[client, server]`.
    pub socks: [TcpStream; 2],
    pub cookies: [u64; 2],
    /// `tcp_bytes_written` of each socket just before it was spliced: the
    /// connected side's SYN, and the PROXY header lb may have written.
    pub written_base: [u64; 2],
    /// FIN received on this side.
    pub rd_closed: [bool; 2],
    /// We sent FIN (shutdown(Write)) on this side.
    pub wr_shut: [bool; 2],
    /// The bytes received on each side, on their way to the other.
    pub flows: [Flow; 2],
    /// When to look whether it has been idle for `timeouts.idle`.
    pub idle_due: Instant,
}

pub(super) enum Next {
    Keep,
    /// Both directions finished.
    Close,
    /// This side reset or failed; reset the other.
    Abort(usize),
    /// No byte either way for `timeouts.idle`: close both sides.
    Idle,
    /// More than `splice_queue_limit` bytes wait in the kernel for one
    /// side: reset both.
    Overflow,
}

/// The epoll events a socket of a connection with `dirs` is watched for:
/// its FIN always; its data when the watcher copies what it receives, and
/// write space when the watcher copies to it. Data arriving on a spliced
/// socket never wakes the watcher.
pub(super) fn interest(side: usize, dirs: [Dir; 2]) -> EventFlags {
    let mut ev = EventFlags::RDHUP | EventFlags::ET;
    if dirs[side] == Dir::User {
        ev |= EventFlags::IN;
    }
    if dirs[1 - side] == Dir::User {
        ev |= EventFlags::OUT;
    }
    ev
}

impl Conn {
    /// Takes an epoll event of `side`; `maps` for the verdict's count of a
    /// side that was reset.
    pub fn on_event(&mut self, side: usize, events: EventFlags, maps: &ConnMaps) -> Next {
        let hup = events.intersects(EventFlags::HUP | EventFlags::ERR);
        // A pending error is in the event (`tcp_poll` sets EPOLLERR while
        // `sk_err` is set, and setting it wakes the socket again), so a plain
        // end (HUP alone, both directions shut) costs no SO_ERROR read. The
        // error is not read (reading clears it): a holder that takes the
        // connection over sees the reset again when it registers it.
        if events.contains(EventFlags::ERR) {
            log::debug!("{} side reset or failed", side_name(side));
            self.rd_closed[side] = true;
            match &mut self.flows[side] {
                // Every byte the side received before its reset has been
                // through the verdict by now (it runs as each arrives).
                Flow::Kernel(_) => {
                    let sent = maps.redirected(self.cookies[side]).unwrap_or(0);
                    self.flows[side] = Flow::Reset(sent, Drain::new(Instant::now()));
                }
                Flow::Done(n) | Flow::Copied(n) => {
                    let n = *n;
                    self.flows[side] = Flow::Reset(n, Drain::new(Instant::now()));
                }
                // The copy reads what was queued before the reset, then ends.
                Flow::User(copy) => copy.reset = true,
                Flow::Reset(..) => {}
            }
        }
        // A copied direction sees its FIN as the end of its reads instead.
        if let Flow::Kernel(drain) = &mut self.flows[side]
            && (hup || events.contains(EventFlags::RDHUP))
            && !self.rd_closed[side]
        {
            self.rd_closed[side] = true;
            *drain = Some(Drain::new(Instant::now()));
        }
        self.progress()
    }

    /// Bytes written on side `to` since the splice; `enough`: the count that
    /// would settle the question (see [`sys::tcp_bytes_written`]).
    pub fn written(&self, to: usize, enough: u64) -> u64 {
        written_since_splice(&self.socks, &self.written_base, to, enough)
    }

    /// Whether the kernel moves the bytes side `from` receives.
    pub fn spliced(&self, from: usize) -> bool {
        matches!(self.flows[from], Flow::Kernel(_))
    }

    /// Moves copied bytes and forwards pending EOFs whose bytes have all
    /// reached the peer (looking at those whose look is due).
    pub fn progress(&mut self) -> Next {
        let now = Instant::now();
        for from in [0, 1] {
            let to = 1 - from;
            let peer_reset = matches!(self.flows[to], Flow::Reset(..));
            let next = match &mut self.flows[from] {
                Flow::User(copy) => {
                    let next = pump(copy, &self.socks, from, &mut self.rd_closed, &mut self.wr_shut);
                    if copy.eof && copy.off == copy.len && copy.reset {
                        self.flows[from] = Flow::Reset(copy.bytes, Drain::new(now));
                    } else if copy.eof && copy.off == copy.len && self.wr_shut[to] {
                        self.flows[from] = Flow::Copied(copy.bytes);
                    }
                    next
                }
                Flow::Kernel(None) | Flow::Done(_) | Flow::Copied(_) => Next::Keep,
                Flow::Kernel(Some(d)) | Flow::Reset(_, d) if d.next > now => Next::Keep,
                Flow::Reset(sent, d) => {
                    // Acknowledged, not only written: a reset throws away
                    // what the peer's send queue still holds.
                    let acked = sys::tcp_bytes_acked(&self.socks[to]).map(|a| a.saturating_sub(self.written_base[to]));
                    match acked {
                        Ok(acked) if acked < *sent && !peer_reset => {
                            if acked > d.last_written {
                                d.reschedule(now, acked, *sent);
                                (d.last_written, d.last_progress) = (acked, now);
                                Next::Keep
                            } else if now.duration_since(d.last_progress) > DRAIN_STALL {
                                log::warn!(
                                    "{} acknowledged no bytes for {DRAIN_STALL:?} after the {} reset ({acked} of \
                                     {sent} bytes delivered); resetting it",
                                    side_name(to),
                                    side_name(from)
                                );
                                Next::Abort(from)
                            } else {
                                d.reschedule(now, acked, *sent);
                                Next::Keep
                            }
                        }
                        // All of it, or the peer is gone or reset as well.
                        _ => Next::Abort(from),
                    }
                }
                Flow::Kernel(Some(d)) => {
                    // tcpi_bytes_received counts the FIN, which is in by now.
                    // Every byte written to `to` since the splice came from
                    // `from` through the verdict, so written <= redirected <=
                    // received, and written == received means all of them are
                    // out: no record read needed.
                    let received = sys::tcp_bytes_received(&self.socks[from]).unwrap_or(1).saturating_sub(1);
                    let written = written_since_splice(&self.socks, &self.written_base, to, received);
                    log::trace!("drain {}: received {received} written {written}", side_name(from));
                    if written >= received {
                        // Errors here mean the peer is already gone; its own event follows.
                        let _ = self.socks[to].shutdown(Shutdown::Write);
                        self.wr_shut[to] = true;
                        self.flows[from] = Flow::Done(received);
                        Next::Keep
                    } else if written > d.last_written {
                        d.reschedule(now, written, received);
                        d.last_written = written;
                        d.last_progress = now;
                        Next::Keep
                    } else if now.duration_since(d.last_progress) > DRAIN_STALL {
                        log::warn!(
                            "{} accepted no bytes for {DRAIN_STALL:?} after the {} closed ({written} of \
                             {received} bytes delivered); resetting",
                            side_name(to),
                            side_name(from)
                        );
                        Next::Abort(to)
                    } else {
                        d.reschedule(now, written, received);
                        Next::Keep
                    }
                }
            };
            if !matches!(next, Next::Keep) {
                return next;
            }
        }
        if self.rd_closed == [true; 2] && self.wr_shut == [true; 2] { Next::Close } else { Next::Keep }
    }

    /// Lets go of the connection without closing it.
    pub fn detach(self, id: u64) -> super::Detached {
        let copy = match &self.flows[CLIENT] {
            Flow::User(c) => {
                Some(super::CopyState { pending: c.buf[c.off..c.len].to_vec(), eof: c.eof, bytes: c.bytes })
            }
            Flow::Copied(n) => Some(super::CopyState { pending: Vec::new(), eof: true, bytes: *n }),
            Flow::Kernel(_) | Flow::Done(_) | Flow::Reset(..) => None,
        };
        super::Detached { id, socks: self.socks, copy }
    }

    /// When the next look at a direction waiting for the kernel to finish
    /// delivering before its EOF is forwarded is due, if one waits.
    pub fn next_look(&self) -> Option<Instant> {
        self.flows
            .iter()
            .filter_map(|f| match f {
                Flow::Kernel(Some(d)) | Flow::Reset(_, d) => Some(d.next),
                _ => None,
            })
            .min()
    }

    /// Bytes moved from each side to the other (client->server,
    /// server->client); a finished direction's count is known without
    /// reading its record again.
    pub fn bytes(&self, maps: &ConnMaps) -> [u64; 2] {
        [0, 1].map(|side| match &self.flows[side] {
            Flow::User(c) => c.bytes,
            Flow::Done(n) | Flow::Copied(n) | Flow::Reset(n, _) => *n,
            Flow::Kernel(_) => maps.redirected(self.cookies[side]).unwrap_or(0),
        })
    }

    /// `CLOCK_MONOTONIC_COARSE` ns of the last byte either way, if known
    /// (the verdict's records, the watcher's copies).
    pub fn last_active(&self, maps: &ConnMaps) -> Option<u64> {
        let kernel = self.cookies.iter().filter_map(|c| maps.record(*c)).map(|r| r.last_active_ns);
        let copied = self.flows.iter().filter_map(|f| match f {
            Flow::User(c) => Some(c.last_ns),
            Flow::Kernel(_) | Flow::Done(_) | Flow::Copied(_) | Flow::Reset(..) => None,
        });
        kernel.chain(copied).max()
    }
}

/// [`Conn::written`], on the fields alone, for where a direction's flow is
/// borrowed.
fn written_since_splice(socks: &[TcpStream; 2], base: &[u64; 2], to: usize, enough: u64) -> u64 {
    sys::tcp_bytes_written(&socks[to], base[to] + enough).unwrap_or(0).saturating_sub(base[to])
}

/// Copies what side `from` received to the other side until either would
/// block; at the source's EOF, once everything is written, forwards it.
fn pump(c: &mut Copy, socks: &[TcpStream; 2], from: usize, rd_closed: &mut [bool; 2], wr_shut: &mut [bool; 2]) -> Next {
    use std::io::{ErrorKind, Read as _, Write as _};
    let to = 1 - from;
    if wr_shut[to] {
        return Next::Keep;
    }
    loop {
        if c.off < c.len {
            match (&socks[to]).write(&c.buf[c.off..c.len]) {
                Ok(n) => c.off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{} side failed while written to: {e}", side_name(to));
                    return Next::Abort(to);
                }
            }
            continue;
        }
        if c.eof {
            if !c.reset {
                let _ = socks[to].shutdown(Shutdown::Write);
                wr_shut[to] = true;
            }
            return Next::Keep;
        }
        match (&socks[from]).read(&mut c.buf) {
            Ok(0) => {
                c.eof = true;
                rd_closed[from] = true;
            }
            Ok(n) => {
                (c.len, c.off) = (n, 0);
                c.bytes += n as u64;
                c.last_ns = sys::monotonic_coarse_ns();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Reset (or failed): what was read goes on, then the peer is reset.
            Err(e) => {
                log::debug!("{} side failed while read: {e}", side_name(from));
                (c.eof, c.reset) = (true, true);
                rd_closed[from] = true;
            }
        }
    }
}

pub(super) fn side_name(side: usize) -> &'static str {
    if side == CLIENT { "client" } else { "server" }
}
