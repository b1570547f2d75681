//! `lb-hold`: hold many idle TCP connections, from several processes so that
//! none passes the per-process open-files limit.
//!
//! - `lb-hold sink --listen ADDR`: an SO_REUSEPORT listener that echoes and
//!   holds every connection; prints `{"listen": "ip:port"}` once bound.
//! - `lb-hold clients --target ADDR --src IP --count N`: opens N connections
//!   from IP (any port), each proving the path with a one-byte echo; prints
//!   `{"ok": n, "failed": m, "secs": s}` and holds them.
//!
//! Both run until their stdin closes, so they die with whoever started them.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

#[derive(clap::Parser)]
#[command(name = "lb-hold", about = "Hold many idle TCP connections (lb's benchmark and hold tool)")]
enum Cmd {
    /// An SO_REUSEPORT listener that echoes and holds every connection.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens COUNT connections from SRC to TARGET, each checked by a one-byte echo, and holds them.
    Clients {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        count: usize,
    },
}

async fn wait_stdin_eof() {
    let mut buf = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn sink(listen: SocketAddr) {
    let sock = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.expect("socket");
    sock.set_reuseport(true).expect("SO_REUSEPORT");
    sock.set_reuseaddr(true).expect("SO_REUSEADDR");
    sock.bind(listen).unwrap_or_else(|e| panic!("lb-hold sink: bind {listen}: {e}"));
    let l = sock.listen(4096).expect("listen");
    println!("{}", serde_json::json!({ "listen": l.local_addr().unwrap().to_string() }));
    let accept = async {
        loop {
            if let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = wait_stdin_eof() => {}
    }
}

async fn one(target: SocketAddr, src: IpAddr) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // IP_BIND_ADDRESS_NO_PORT: the port is picked per 4-tuple at connect,
    // so one source address reaches many sinks (no crate wraps it).
    let one: libc::c_int = 1;
    // SAFETY: valid fd and a c_int option value.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = tokio::time::timeout(Duration::from_secs(10), sock.connect(target)).await??;
    s.write_all(b"h").await?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await? {
        Ok(1) => Ok(s),
        Ok(_) => Err(std::io::Error::other("closed")),
        Err(e) => Err(e),
    }
}

async fn clients(target: SocketAddr, src: IpAddr, count: usize) {
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    let mut first_error = None;
    // A bounded number of handshakes in flight keeps backlogs from overflowing.
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < count || !pending.is_empty() {
        while started < count && pending.len() < 256 {
            pending.spawn(one(target, src));
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(s))) => held.push(s),
            Some(Ok(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
            _ => failed += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({ "ok": held.len(), "failed": failed, "secs": t0.elapsed().as_secs_f64(), "error": first_error })
    );
    wait_stdin_eof().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match <Cmd as clap::Parser>::parse() {
        Cmd::Sink { listen } => rt.block_on(sink(listen)),
        Cmd::Clients { target, src, count } => rt.block_on(clients(target, src, count)),
    }
}
