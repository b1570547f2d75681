//! `lb-bench`: the benchmark's load generator and backend, as separate
//! processes so the proxy under test competes with both like in production.
//!
//! - `lb-bench sink --listen ADDR`: per connection, the first byte picks the
//!   protocol: `T` read to EOF, then answer the byte count (u64 LE) and close;
//!   `E` echo everything. Prints `{"listen": "ip:port"}`, runs until stdin closes.
//! - `lb-bench throughput --target ADDR --streams N --secs S`
//! - `lb-bench pingpong --target ADDR --secs S [--size 64]`
//! - `lb-bench connrate --target ADDR --secs S [--concurrency C]`
//!
//! Client modes print one JSON line with their result.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    match args.windows(2).find(|w| w[0] == name) {
        Some(w) => w[1].parse().unwrap_or_else(|_| panic!("lb-bench: bad value for {name}: {}", w[1])),
        None => default.unwrap_or_else(|| panic!("lb-bench: missing {name}")),
    }
}

async fn sink(listen: SocketAddr) {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_reuseaddr(true).unwrap();
    sock.bind(listen).unwrap_or_else(|e| panic!("lb-bench sink: bind {listen}: {e}"));
    let l: TcpListener = sock.listen(4096).expect("listen");
    println!("{}", serde_json::json!({ "listen": l.local_addr().unwrap().to_string() }));
    let serve = async {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                if kind[0] == b'T' {
                    let mut total = 0u64;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = s.write_all(&total.to_le_bytes()).await;
                } else {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    };
    let stdin_closed = async {
        let mut b = [0u8; 16];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut b).await, Ok(n) if n > 0) {}
    };
    tokio::select! { _ = serve => {}, _ = stdin_closed => {} }
}

/// One bulk stream for `secs`; returns the bytes the sink counted.
async fn stream_bulk(target: SocketAddr, secs: f64) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(target).await?;
    s.write_all(b"T").await?;
    let buf = vec![0x5au8; 256 * 1024];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        s.write_all(&buf).await?;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    Ok(u64::from_le_bytes(count))
}

async fn throughput(target: SocketAddr, streams: usize, secs: f64) -> serde_json::Value {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..streams).map(|_| tokio::spawn(stream_bulk(target, secs))).collect();
    let mut bytes = 0;
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(b)) => bytes += b,
            _ => errors += 1,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    serde_json::json!({ "bytes": bytes, "secs": wall, "gbit_per_s": bytes as f64 * 8.0 / wall / 1e9, "errors": errors })
}

/// Blocking sockets on one thread: the client adds as little latency as it can.
fn pingpong(target: SocketAddr, secs: f64, size: usize) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(target).expect("connect");
    s.set_nodelay(true).unwrap();
    s.write_all(b"E").unwrap();
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    // Warm the path (and the kernel's splice) before timing.
    for _ in 0..100 {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let mut lat: Vec<f64> = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let avg = lat.iter().sum::<f64>() / lat.len() as f64;
    serde_json::json!({ "n": lat.len(), "avg_us": avg, "p50_us": q(0.50), "p99_us": q(0.99), "p999_us": q(0.999) })
}

async fn connrate(target: SocketAddr, secs: f64, concurrency: usize) -> serde_json::Value {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                while !stop.load(Relaxed) {
                    let r = async {
                        let mut s = TcpStream::connect(target).await?;
                        // No TIME_WAIT pile-up on the client (RST on close; never blocks: nothing unsent).
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                        s.write_all(b"Ehello, lb bench").await?;
                        s.read_exact(&mut b[..15]).await?;
                        std::io::Result::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), r).await {
                        Ok(Ok(())) => done.fetch_add(1, Relaxed),
                        _ => errors.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Relaxed);
    let n = done.load(Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    serde_json::json!({ "conns": n, "per_s": n as f64 / wall, "errors": errors.load(Relaxed) })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let out = match args.get(1).map(String::as_str) {
        Some("sink") => {
            // One thread: an echo answers on the thread that read it.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(sink(arg(&args, "--listen", Some("127.0.0.1:0".parse().unwrap()))));
            return;
        }
        Some("throughput") => rt.block_on(throughput(
            arg(&args, "--target", None),
            arg(&args, "--streams", Some(1)),
            arg(&args, "--secs", Some(3.0)),
        )),
        Some("pingpong") => {
            pingpong(arg(&args, "--target", None), arg(&args, "--secs", Some(3.0)), arg(&args, "--size", Some(64)))
        }
        Some("connrate") => rt.block_on(connrate(
            arg(&args, "--target", None),
            arg(&args, "--secs", Some(3.0)),
            arg(&args, "--concurrency", Some(16)),
        )),
        _ => {
            eprintln!("usage: lb-bench sink|throughput|pingpong|connrate …");
            std::process::exit(2);
        }
    };
    println!("{out}");
}
