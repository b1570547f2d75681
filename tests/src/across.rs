//! lb between namespaces: client — lb — server over two veth pairs
//! ([`Triangle`]), as on a host with clients and servers behind different
//! interfaces. The test's thread is in lb's namespace (lb starts there);
//! the server listens in the server's, and clients connect from the
//! client's.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use crate::{
    Lb, Mode,
    backends::{self, Backend, read_and_check, write_stream},
    lbproc::kernel_available,
    netns::{Triangle, within},
};

const FRONT_PORT: u16 = 7000;
const SERVER_PORT: u16 = 7001;

/// The running setup. Dropped in field order: lb stops before the
/// namespaces go.
pub struct Across {
    pub lb: Lb,
    /// lb's frontend, as the client reaches it.
    pub front: SocketAddr,
    pub backend: Backend,
    pub rt: tokio::runtime::Runtime,
    pub tri: Triangle,
}

impl Across {
    /// The namespaces, the server (serving `handler`) and lb in `mode` with
    /// one frontend to it, over IPv4; a runtime on this thread. `prepare`
    /// runs once the namespaces are up, before anything listens (sysctls,
    /// MTUs). `None`: the kernel plane is unavailable (not in CI).
    pub fn start<F, Fut>(mode: Mode, test: &str, prepare: impl FnOnce(&Triangle), handler: F) -> Option<Across>
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self::start_on(false, mode, test, prepare, handler)
    }

    /// [`Self::start`], over IPv6 when `v6`.
    pub fn start_on<F, Fut>(
        v6: bool,
        mode: Mode,
        test: &str,
        prepare: impl FnOnce(&Triangle),
        handler: F,
    ) -> Option<Across>
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if !kernel_available(test) {
            return None;
        }
        let tri = Triangle::enter(test);
        prepare(&tri);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (front, server) =
            if v6 { (Triangle::FRONT6, Triangle::SERVER6) } else { (Triangle::FRONT, Triangle::SERVER) };
        let front = SocketAddr::new(front.parse().unwrap(), FRONT_PORT);
        let at = SocketAddr::new(server.parse().unwrap(), SERVER_PORT);
        let backend = rt.block_on(async {
            let l = tri.server.within(|| backends::listen(at)).unwrap_or_else(|e| panic!("{test}: server {at}: {e}"));
            Backend::serve(l, handler)
        });
        let body = format!(
            "access_log = false\n[[frontend]]\nname = \"t\"\nlisten = \"{front}\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\nservers = [\"{at}\"]\n"
        );
        let lb = Lb::start_with(mode, test, &body)?;
        Some(Across { lb, front, backend, rt, tri })
    }

    /// On the packet plane: the program sent packets out of an interface
    /// toward their peers (its counter).
    pub fn assert_sent_out(&self, test: &str) {
        let p = self.lb.pinned_stats()["packet"].clone();
        let out = p["redirected"].as_u64().unwrap_or(0);
        assert!(out > 0, "{test}: the program sent no packet out of an interface: {p}");
        eprintln!("[packet] {test}: {out} packets sent out toward their peers");
    }

    /// Sockets lb holds toward the server (none once every connection is joined).
    pub fn held_toward_server(&self) -> usize {
        let (from, to) = if self.front.is_ipv6() {
            (format!("[{}]", Triangle::SOURCE6), format!("[{}]", Triangle::SERVER6))
        } else {
            (Triangle::SOURCE.to_owned(), Triangle::SERVER.to_owned())
        };
        self.tri.lb.ss_count(&from, &to)
    }
}

/// A connection to `front` from the client's namespace (`client`: its name).
pub async fn connect(client: &str, front: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = within(client, || if front.is_ipv6() { TcpSocket::new_v6() } else { TcpSocket::new_v4() })?;
    socket.connect(front).await
}

/// The server that echoes every byte, and closes after the client's EOF.
pub async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// `n` connections from the client's namespace to an echo server, each
/// having said hello and had it back.
pub async fn hello_all(client: &str, front: SocketAddr, n: usize, test: &str) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for i in 0..n {
        let mut s = connect(client, front).await.unwrap_or_else(|e| panic!("{test}: connect {i}: {e}"));
        let hello = [i as u8; 16];
        s.write_all(&hello).await.unwrap();
        let mut back = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("{test}: no echo of hello {i}"))
            .unwrap();
        assert_eq!(back, hello, "{test}: hello {i} came back changed");
        conns.push(s);
    }
    conns
}

/// Through an echo server, every connection at once sends `sizes[i %
/// len]` bytes of its own stream, then its FIN, and reads it all back to
/// the echo's FIN. Returns the failures.
pub async fn bulk_both_ways(conns: Vec<TcpStream>, sizes: &'static [u64]) -> Vec<String> {
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                let (seed, size) = (i as u64 + 1, sizes[i % sizes.len()]);
                let (mut r, mut w) = s.into_split();
                let send = async {
                    write_stream(&mut w, seed, size).await?;
                    w.shutdown().await
                };
                let (sent, got) = tokio::join!(send, read_and_check(&mut r, seed, size));
                sent.map_err(|e| format!("connection {i}: sending {size} bytes: {e}"))?;
                match got {
                    Ok((_, true)) => Ok(()),
                    Ok((n, false)) => Err(format!("connection {i}: got {n} of {size} bytes, or not intact")),
                    Err(e) => Err(format!("connection {i}: receiving: {e}")),
                }
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t).await {
            Err(_) => failed.push("a transfer hung for 60 s".to_owned()),
            Ok(r) => {
                if let Err(e) = r.expect("transfer task") {
                    failed.push(e);
                }
            }
        }
    }
    failed
}
