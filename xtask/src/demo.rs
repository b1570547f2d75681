//! `cargo xtask demo`: lb on loopback with echo backends and thousands of
//! concurrent clients exchanging checked data, then what happened.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testkit::{
    Lb,
    backends::Backend,
    lbproc,
    stream::{Rng, Stream},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = include_str!("../demo.toml");

#[derive(Default)]
struct Totals {
    connected: AtomicU64,
    exchanges: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

pub fn demo(lb_bin: &Path, clients: usize, seconds: u64) -> anyhow::Result<()> {
    // SAFETY: setting an env var before any thread is started.
    unsafe { std::env::set_var("LB_BIN", lb_bin) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(clients, seconds))
}

async fn run(clients: usize, seconds: u64) -> anyhow::Result<()> {
    let backends = [Backend::echo().await, Backend::echo().await, Backend::echo().await];
    let servers: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let (dir, pin_path) = lbproc::scratch();
    let cfg = CONFIG.replace("{SERVERS}", &servers.join(", ")).replace("{PIN_PATH}", &pin_path.to_string_lossy());
    println!("== config\n{}", cfg.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n"));
    let mut lb = Lb::launch("demo", dir, pin_path, &cfg);
    println!("== lb pid {} listening on {}, data plane: {}", lb.pid, lb.addr, lb.dataplane);

    let totals = Arc::new(Totals::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let (t, addr) = (totals.clone(), lb.addr);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = client(addr, i as u64, deadline, &t).await
                && t.errors.fetch_add(1, Relaxed) < 5
            {
                eprintln!("client {i}: {e}");
            }
        }));
    }
    let mut peak_active = 0;
    let mut stats_table = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if stats_table.is_none() && deadline.saturating_duration_since(Instant::now()) < Duration::from_millis(1500) {
            stats_table = Some(lb_stats(&lb.pin_path)?);
        }
        let c = totals.connected.load(Relaxed);
        peak_active = peak_active.max(c);
        println!(
            "  t={:>2}s  clients connected {c:>5}  exchanges {:>9}  bytes {:>13}  lb fds {}",
            start.elapsed().as_secs(),
            totals.exchanges.load(Relaxed),
            totals.bytes.load(Relaxed),
            lb.pids().iter().map(|p| testkit::fd_count(*p)).sum::<usize>()
        );
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ex, bytes, errors) = (totals.exchanges.load(Relaxed), totals.bytes.load(Relaxed), totals.errors.load(Relaxed));
    println!("== traffic");
    println!("  clients            {clients} concurrent, peak connected {peak_active}");
    println!("  exchanges          {ex} request/replies, every reply byte checked");
    println!("  bytes through lb   {bytes} ({:.1} MiB/s each way)", bytes as f64 / 2.0 / elapsed / 1048576.0);
    println!("  client errors      {errors}");
    println!(
        "  lb CPU time        {:.2}s over {elapsed:.1}s",
        lb.pids().iter().map(|p| testkit::cpu_time(*p).as_secs_f64()).sum::<f64>()
    );
    println!("  lb peak RSS        {} KiB", lb.pids().iter().map(|p| testkit::status_kb(*p, "VmHWM")).sum::<u64>());
    println!("== lb stats --pin-path {} (one second before the end, all clients connected)", lb.pin_path.display());
    print!("{}", stats_table.context("lb stats was not sampled")?);
    println!("== bpftool map dump pinned {}/LB_SERVERS", lb.pin_path.display());
    match std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(lb.pin_path.join("LB_SERVERS"))
        .output()
    {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => println!("  (bpftool failed: {})", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => println!("  (bpftool not available: {e})"),
    }
    let clean = lb.stop();
    println!("== lb log");
    for l in lb.stderr().lines() {
        println!("  {l}");
    }
    drop(backends);
    if !clean {
        bail!("lb did not stop cleanly on SIGTERM");
    }
    if errors > 0 {
        bail!("{errors} clients failed");
    }
    if ex == 0 {
        bail!("no exchange completed");
    }
    Ok(())
}

/// `lb stats` (the human table) of the instance pinned at `pin_path`.
fn lb_stats(pin_path: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(lbproc::lb_bin()).arg("stats").arg("--pin-path").arg(pin_path).output()?;
    if !out.status.success() {
        bail!("lb stats failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Until `deadline`: send a message of 1..16 KiB, read the echo, check it.
async fn client(addr: std::net::SocketAddr, id: u64, deadline: Instant, t: &Totals) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    t.connected.fetch_add(1, Relaxed);
    let mut rng = Rng::new(id * 7919 + 1);
    let mut out = vec![0u8; 16384];
    let mut back = vec![0u8; 16384];
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let n = 1 + (rng.next_u64() % 16384) as usize;
        Stream::new(id << 32 | seq).fill(&mut out[..n]);
        s.write_all(&out[..n]).await.context("write")?;
        s.read_exact(&mut back[..n]).await.context("read echo")?;
        if back[..n] != out[..n] {
            bail!("echo differs from what was sent (exchange {seq})");
        }
        t.exchanges.fetch_add(1, Relaxed);
        t.bytes.fetch_add(2 * n as u64, Relaxed);
        seq += 1;
        // Long-lived connections mostly idle: pause like a chatty client would.
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 200)).await;
    }
    s.shutdown().await.context("shutdown")?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.context("read to EOF")?;
    t.connected.fetch_sub(1, Relaxed);
    if !rest.is_empty() {
        bail!("{} unexpected bytes after EOF", rest.len());
    }
    Ok(())
}
