//! Backend servers and clients that speak small test protocols.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use crate::stream::Stream;

const CHUNK: usize = 256 * 1024;

/// A server on 127.0.0.1:0 running `handler` per connection. Stops accepting on drop.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on `addr`, made at once (in the calling thread's network
/// namespace), with the kernel's largest backlog (somaxconn 4096), not
/// tokio's 1024: a burst of clients through lb must not overflow the
/// backend's accept queue and time lb's connects out. Call it inside a
/// runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

impl Backend {
    pub async fn spawn<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self::spawn_at("127.0.0.1:0".parse().unwrap(), handler).await
    }

    /// [`Self::spawn`] on a given address.
    pub async fn spawn_at<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = listen(addr).unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
        Self::serve(l, handler)
    }

    /// Runs `handler` for every connection `l` accepts (on the runtime of
    /// the caller).
    pub fn serve<F, Fut>(l: TcpListener, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = l.local_addr().expect("backend addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let acc = accepted.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                acc.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(handler(s));
            }
        });
        Backend { addr, accepted, task }
    }

    /// Echoes every byte, then closes after the client's EOF.
    pub async fn echo() -> Backend {
        Self::spawn(|s| async move { echo(s).await }).await
    }

    /// [`Self::echo`] on a given address.
    pub async fn echo_at(addr: SocketAddr) -> Backend {
        Self::spawn_at(addr, |s| async move { echo(s).await }).await
    }

    /// Sends `banner` at accept (server speaks first), then echoes.
    pub async fn banner(banner: &'static [u8]) -> Backend {
        Self::banner_at("127.0.0.1:0".parse().unwrap(), banner).await
    }

    /// [`Self::banner`] on a given address.
    pub async fn banner_at(addr: SocketAddr, banner: &'static [u8]) -> Backend {
        Self::spawn_at(addr, move |mut s| async move {
            if s.write_all(banner).await.is_ok() {
                echo(s).await;
            }
        })
        .await
    }

    /// A free loopback address whose port is below the ephemeral range
    /// (`net.ipv4.ip_local_port_range`), for a backend a test stops and
    /// starts again at the same address: a port the kernel hands out for
    /// `bind(0)` or `connect()` could be taken by another test's connection
    /// (lb's included) while that backend is down.
    pub fn stable_addr() -> SocketAddr {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let (first, span) = (10_000u16, low.saturating_sub(10_000).max(1));
        // Tests run in parallel in one process and in several: start where
        // others are unlikely to, and take the first port free now.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = u64::from(std::process::id()) * 7919 + NEXT.fetch_add(97, Ordering::Relaxed);
        for i in 0..u64::from(span) {
            let port = first + ((seed + i) % u64::from(span)) as u16;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if std::net::TcpListener::bind(addr).is_ok() {
                return addr;
            }
        }
        panic!("no free loopback port between {first} and {low}");
    }

    /// Reads everything to EOF, then sends it all back and closes: a reply
    /// proves the client's FIN arrived.
    pub async fn echo_after_eof() -> Backend {
        Self::spawn(|mut s| async move {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let _ = s.write_all(&got).await;
            let _ = s.shutdown().await;
        })
        .await
    }

    /// Reads everything to EOF, then replies with `reply_len` stream bytes
    /// (seed = bytes received) and closes.
    pub async fn read_then_reply(reply_len: usize) -> Backend {
        Self::spawn(move |mut s| async move {
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_err() {
                return;
            }
            let mut reply = vec![0u8; reply_len];
            Stream::new(got.len() as u64).fill(&mut reply);
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
        })
        .await
    }

    /// Reads the first byte, then resets the connection.
    pub async fn reset_after_first_byte() -> Backend {
        Self::spawn(|mut s| async move {
            let mut b = [0u8; 1];
            let _ = s.read_exact(&mut b).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        })
        .await
    }

    /// The transfer protocol (see [`transfer`]); each connection's verdict is pushed to `results`.
    pub async fn transfer(results: Arc<Mutex<Vec<TransferReport>>>) -> Backend {
        Self::spawn(move |s| {
            let results = results.clone();
            async move {
                let r = serve_transfer(s).await;
                results.lock().unwrap().push(r);
            }
        })
        .await
    }
}

async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// What the server side of a transfer saw.
#[derive(Clone, Debug)]
pub struct TransferReport {
    pub seed: u64,
    pub up_expected: u64,
    pub up_received: u64,
    pub up_intact: bool,
    pub error: Option<String>,
}

/// Transfer protocol: the client sends `[seed, up_len, down_len]` (u64 LE),
/// then `up_len` bytes of `Stream(seed)` and shuts down its write side; the
/// server at the same time sends `down_len` bytes of `Stream(!seed)` and
/// shuts down. Each side checks every byte it receives and the EOF position.
async fn serve_transfer(mut s: TcpStream) -> TransferReport {
    let mut hdr = [0u8; 24];
    let mut rep = TransferReport { seed: 0, up_expected: 0, up_received: 0, up_intact: false, error: None };
    if let Err(e) = s.read_exact(&mut hdr).await {
        rep.error = Some(format!("reading header: {e}"));
        return rep;
    }
    let word = |i: usize| u64::from_le_bytes(hdr[i * 8..i * 8 + 8].try_into().unwrap());
    let (seed, up, down) = (word(0), word(1), word(2));
    rep.seed = seed;
    rep.up_expected = up;
    let (mut r, mut w) = s.split();
    let recv = async {
        let (n, ok) = read_and_check(&mut r, seed, up).await?;
        Ok::<_, std::io::Error>((n, ok))
    };
    let send = async {
        write_stream(&mut w, !seed, down).await?;
        w.shutdown().await
    };
    let (rv, sv) = tokio::join!(recv, send);
    match rv {
        Ok((n, ok)) => {
            rep.up_received = n;
            rep.up_intact = ok && n == up;
        }
        Err(e) => rep.error = Some(format!("receiving: {e}")),
    }
    if let Err(e) = sv {
        rep.error.get_or_insert(format!("sending: {e}"));
    }
    rep
}

/// Writes `len` bytes of `Stream(seed)`.
pub async fn write_stream<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: u64) -> std::io::Result<()> {
    let mut st = Stream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        st.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads to EOF; returns (bytes read, whether the first `expect` bytes
/// matched `Stream(seed)` and nothing followed).
pub async fn read_and_check<R: AsyncReadExt + Unpin>(
    r: &mut R,
    seed: u64,
    expect: u64,
) -> std::io::Result<(u64, bool)> {
    let mut st = Stream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut scratch = Vec::new();
    let (mut total, mut ok) = (0u64, true);
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, ok && total == expect));
        }
        let within = (expect.saturating_sub(total)).min(n as u64) as usize;
        if within < n || !st.check(&buf[..within], &mut scratch) {
            ok = false;
        }
        total += n as u64;
    }
}

/// Client side of the transfer protocol through `addr`.
pub async fn transfer(addr: SocketAddr, seed: u64, up: u64, down: u64) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let mut hdr = Vec::with_capacity(24);
    for v in [seed, up, down] {
        hdr.extend_from_slice(&v.to_le_bytes());
    }
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&hdr).await?;
        write_stream(&mut w, seed, up).await?;
        w.shutdown().await
    };
    let recv = read_and_check(&mut r, !seed, down);
    let (sv, rv) = tokio::join!(send, recv);
    sv.map_err(|e| format!("seed {seed}: sending {up} bytes: {e}"))?;
    match rv {
        Ok((_, true)) => Ok(()),
        Ok((n, false)) => Err(format!("seed {seed}: download corrupt or wrong length: got {n} of {down} bytes")),
        Err(e) => Err(format!("seed {seed}: receiving: {e}")),
    }
}
