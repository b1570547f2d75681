//! What a worker and its holder say to each other: one JSON document per
//! `SOCK_SEQPACKET` message, the sockets it is about in `SCM_RIGHTS`.
//!
//! - worker → holder: [`ToHolder::Hello`] once, then one [`ToHolder::Hold`]
//!   per spliced connection, with its two sockets `[client, server]`;
//! - holder → worker: [`ToWorker::Welcome`] with the frontends' listening
//!   sockets, the connections it already holds in [`ToWorker::Live`]
//!   chunks, [`ToWorker::LiveEnd`], then [`ToWorker::Refused`] for
//!   connections it could not keep (out of descriptors: it reset them) and
//!   [`ToWorker::Closed`] batches. The worker closes its own descriptors
//!   as soon as a [`ToHolder::Hold`] is sent; no answer is needed for the
//!   connections the holder keeps;
//! - between an old and a new holder (`lb upgrade`): see `handover.rs`.

use std::{
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// Protocol version: a worker and a holder of different versions refuse
/// each other instead of misreading.
pub const VERSION: u32 = 2;
/// Largest message either side sends or takes.
pub const MAX_MSG: usize = 192 * 1024;
/// Most descriptors in one message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 252;
/// Connections per [`ToWorker::Live`] and closes per [`ToWorker::Closed`].
pub const CHUNK: usize = 256;

/// One spliced connection, as the holder keeps it and hands it to a worker
/// that starts later.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    /// The client socket's cookie: unique for the machine's uptime.
    pub id: u64,
    /// `[client, server]` socket cookies.
    pub cookies: [u64; 2],
    /// `tcpi_bytes_sent` of each socket just before the splice.
    pub written_base: [u64; 2],
    /// The client's bytes are copied by the holder (its side could not be
    /// spliced); the server's always go through the kernel.
    pub client_copied: bool,
    pub frontend: u16,
    pub backend: u16,
    pub client: SocketAddr,
    pub source: SocketAddr,
    pub server: SocketAddr,
    /// `CLOCK_MONOTONIC_COARSE` ns when the connection was spliced.
    pub start_ns: u64,
    /// Joined on the packet plane (no sockets come with it): the frontend
    /// address the client connected to, which with the three above names
    /// its flows.
    #[serde(default)]
    pub packet: Option<SocketAddr>,
}

/// How a held connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    Fin,
    Rst,
    Idle,
    Shutdown,
}

/// A held connection that ended, with the bytes it moved each way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Closed {
    pub id: u64,
    /// client → server, server → client.
    pub bytes: [u64; 2],
    pub how: Ending,
}

/// The state of a direction the holder copies itself (the client's, when
/// it could not be spliced), handed from one holder to the next.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CopyState {
    /// Read from the client, not yet written to the server (up to the
    /// copy buffer's 64 KiB; hex in the message, so one fits in [`MAX_MSG`]).
    #[serde(with = "hex_bytes")]
    pub pending: Vec<u8>,
    /// The client's FIN was read.
    pub eof: bool,
    /// Bytes copied so far.
    pub bytes: u64,
}

/// A connection handed from one holder to the next (`lb upgrade`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handed {
    pub held: Held,
    /// `Some` when the client side is copied (`held.client_copied`).
    pub copy: Option<CopyState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToHolder {
    Hello {
        version: u32,
        pid: u32,
    },
    /// With the descriptors `[client, server]`.
    Hold(Held),
    /// A holder of a new binary asks for everything (`lb upgrade`).
    Takeover {
        version: u32,
        pid: u32,
    },
    /// It has everything, and watches nothing until [`ToWorker::HandoverCommit`].
    TookOver,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// With one listening socket per frontend, in config order.
    Welcome {
        version: u32,
        listeners: usize,
    },
    Live(Vec<Held>),
    LiveEnd,
    Refused(Vec<u64>),
    Closed(Vec<Closed>),
    /// To a new holder: one listening socket per frontend, in config order.
    Handover {
        version: u32,
        listeners: usize,
    },
    /// To a new holder: connections with their descriptors, two each in order.
    Conns(Vec<Handed>),
    HandoverEnd,
    /// To a new holder, after its [`ToHolder::TookOver`]: the old holder
    /// has let go for good (and exits); the new one watches from now on.
    HandoverCommit,
}

/// Connections per [`ToWorker::Conns`] at most (two descriptors each).
pub const HANDOVER_CHUNK: usize = MAX_FDS / 2;

impl Handed {
    /// A generous bound on this connection's share of a message.
    pub fn size_hint(&self) -> usize {
        1024 + self.copy.as_ref().map_or(0, |c| 2 * c.pending.len())
    }
}

/// Splits `items` into runs of at most [`HANDOVER_CHUNK`] whose
/// [`Handed::size_hint`]s add up to at most half of [`MAX_MSG`] (a run
/// always takes at least one).
pub fn handover_chunks<T>(items: &[T], hint: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        let h = hint(it);
        if i > start && (i - start == HANDOVER_CHUNK || size + h > MAX_MSG / 2) {
            out.push(&items[start..i]);
            (start, size) = (i, 0);
        }
        size += h;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// `Vec<u8>` as a hex string.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd hex length"));
        }
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(D::Error::custom)).collect()
    }
}

/// A message received, and whether descriptors sent with it were lost
/// (the receiver had no room for them: `MSG_CTRUNC`).
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
    pub fds_lost: bool,
}

/// Sends `msg` with `fds` as one message.
pub fn send<T: Serialize>(sock: impl AsFd, msg: &T, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if body.len() > MAX_MSG || fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!("message too large: {} bytes, {} fds", body.len(), fds.len())));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("descriptors do not fit the control buffer"));
    }
    let sent = rustix::net::sendmsg(sock, &[IoSlice::new(&body)], &mut control, SendFlags::NOSIGNAL)?;
    if sent != body.len() {
        return Err(std::io::Error::other(format!("sent {sent} of {} bytes", body.len())));
    }
    Ok(())
}

/// Sends `items` as messages of at most [`CHUNK`] each, made by `msg`.
pub fn send_chunked<T: Clone>(sock: impl AsFd, items: &[T], msg: fn(Vec<T>) -> ToWorker) -> std::io::Result<()> {
    items.chunks(CHUNK).try_for_each(|c| send(&sock, &msg(c.to_vec()), &[]))
}

/// A `SOCK_SEQPACKET` socket connected to the holder socket at `path`.
pub fn connect(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&sock, &rustix::net::SocketAddrUnix::new(path)?)?;
    Ok(sock)
}

/// Receives one message and the descriptors that came with it; `None` at
/// the end of the stream (the other side is gone).
pub fn recv<T: for<'de> Deserialize<'de>>(sock: impl AsFd) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    match recv_with(sock, RecvFlags::empty())? {
        None => Ok(None),
        Some(r) if r.fds_lost => Err(std::io::Error::other("descriptors lost: out of descriptors")),
        Some(r) => Ok(Some((r.msg, r.fds))),
    }
}

/// [`recv`] with `flags` (`DONTWAIT`: `WouldBlock` when nothing waits),
/// telling lost descriptors apart.
pub fn recv_with<T: for<'de> Deserialize<'de>>(
    sock: impl AsFd,
    flags: RecvFlags,
) -> std::io::Result<Option<Received<T>>> {
    thread_local! {
        // One buffer per thread for every message: a fresh 192 KiB zeroed
        // buffer per message (one per spliced connection) cost the holder
        // a tenth of its CPU while filling.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MSG]);
    }
    BUF.with_borrow_mut(|buf| recv_into(sock, flags, buf))
}

fn recv_into<T: for<'de> Deserialize<'de>>(
    sock: impl AsFd,
    flags: RecvFlags,
    buf: &mut [u8],
) -> std::io::Result<Option<Received<T>>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let r = loop {
        let flags = flags | RecvFlags::CMSG_CLOEXEC;
        match rustix::net::recvmsg(&sock, &mut [IoSliceMut::new(buf)], &mut control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    let fds: Vec<OwnedFd> = control
        .drain()
        .flat_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => fds.collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect();
    if r.bytes == 0 {
        return Ok(None);
    }
    if r.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(std::io::Error::other("message truncated"));
    }
    let fds_lost = r.flags.contains(rustix::net::ReturnFlags::CTRUNC);
    let msg = serde_json::from_slice(&buf[..r.bytes]).map_err(std::io::Error::other)?;
    Ok(Some(Received { msg, fds, fds_lost }))
}

#[cfg(test)]
mod tests {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_together_and_the_end_is_none() {
        let (a, b) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send(&a, &ToWorker::Refused(vec![1, 2, 3]), &[f.as_fd(), f.as_fd()]).unwrap();
        send(&a, &ToWorker::LiveEnd, &[]).unwrap();
        let (m, fds) = recv::<ToWorker>(&b).unwrap().unwrap();
        assert!(matches!(m, ToWorker::Refused(ids) if ids == [1, 2, 3]));
        assert_eq!(fds.len(), 2);
        let (m, fds) = recv::<ToWorker>(&b).unwrap().unwrap();
        assert!(matches!(m, ToWorker::LiveEnd) && fds.is_empty());
        let nothing = recv_with::<ToWorker>(&b, RecvFlags::DONTWAIT).err().map(|e| e.kind());
        assert_eq!(nothing, Some(std::io::ErrorKind::WouldBlock));
        drop(a);
        assert!(recv::<ToWorker>(&b).unwrap().is_none());
    }

    #[test]
    fn a_full_copy_buffer_fits_one_message_and_chunks_respect_the_size() {
        let held = Held {
            id: 1,
            cookies: [1, 2],
            written_base: [0; 2],
            client_copied: true,
            frontend: 0,
            backend: 0,
            client: "[2001:db8::1]:65535".parse().unwrap(),
            source: "[2001:db8::2]:65535".parse().unwrap(),
            server: "[2001:db8::3]:65535".parse().unwrap(),
            start_ns: u64::MAX,
            packet: Some("[2001:db8::4]:65535".parse().unwrap()),
        };
        let full = Handed {
            held: held.clone(),
            copy: Some(CopyState { pending: vec![0xa5; 64 * 1024], eof: true, bytes: 7 }),
        };
        let body = serde_json::to_vec(&ToWorker::Conns(vec![full.clone()])).unwrap();
        assert!(body.len() <= MAX_MSG, "{} bytes", body.len());
        let back: ToWorker = serde_json::from_slice(&body).unwrap();
        assert!(matches!(back, ToWorker::Conns(v) if v[0].copy.as_ref().unwrap().pending == vec![0xa5; 64 * 1024]));
        let plain = Handed { held, copy: None };
        let mixed: Vec<Handed> = (0..300).map(|i| if i % 50 == 7 { full.clone() } else { plain.clone() }).collect();
        let chunks = handover_chunks(&mixed, Handed::size_hint);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 300);
        for c in &chunks {
            assert!(c.len() <= HANDOVER_CHUNK);
            let body = serde_json::to_vec(&ToWorker::Conns(c.to_vec())).unwrap();
            assert!(body.len() <= MAX_MSG, "a chunk of {} is {} bytes", c.len(), body.len());
        }
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![f.as_fd(); MAX_FDS + 1];
        assert!(send(&a, &ToWorker::LiveEnd, &fds).is_err());
    }
}
