//! Active health checks: every `interval`, connect to each server (and
//! optionally send bytes and expect a reply prefix). `fall` failures in a
//! row take a server down, `rise` successes bring it back; each flip is
//! logged once. Down servers get no new connections. With workers, the
//! supervisor runs the checks and relays each flip to every worker.

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc::UnboundedSender,
};

use super::{BackendRt, Backends, command::Command, server::ServerState};
use crate::config::HealthCheck;

/// One check: Ok, or why it failed.
pub async fn check_once(server: &ServerState, hc: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(server.cfg.addr.0).await.map_err(|e| format!("connect: {e}"))?;
        if !hc.send.is_empty() {
            s.write_all(&hc.send).await.map_err(|e| format!("send: {e}"))?;
        }
        if !hc.expect.is_empty() {
            let mut got = vec![0u8; hc.expect.len()];
            let mut n = 0;
            while n < got.len() {
                match s.read(&mut got[n..]).await {
                    Ok(0) => return Err(format!("reply closed after {n} bytes")),
                    Ok(k) => n += k,
                    Err(e) => return Err(format!("reading the reply: {e}")),
                }
            }
            if got != hc.expect {
                return Err(format!(
                    "reply {:?} does not start with {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&hc.expect)
                ));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(hc.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", hc.timeout)),
    }
}

/// Checks `server` until it leaves its backend.
async fn run(
    backends: Arc<Backends>,
    backend: usize,
    server: Arc<ServerState>,
    hc: HealthCheck,
    flips: Option<UnboundedSender<Command>>,
) {
    let name = backends.list[backend].name.clone();
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !backends.list[backend].servers().iter().any(|s| Arc::ptr_eq(s, &server)) {
            return;
        }
        let up = server.up.load(std::sync::atomic::Ordering::Relaxed);
        match check_once(&server, &hc).await {
            Ok(()) => {
                fail_run = 0;
                ok_run = ok_run.saturating_add(1);
                if !up && ok_run >= hc.rise {
                    server.set_up(true);
                    log::info!("backend \"{name}\": server {} is up ({ok_run} checks passed)", server.cfg.addr);
                    flipped(&flips, &name, &server, true);
                }
            }
            Err(why) => {
                ok_run = 0;
                fail_run = fail_run.saturating_add(1);
                if up && fail_run >= hc.fall {
                    server.set_up(false);
                    log::warn!(
                        "backend \"{name}\": server {} is down after {fail_run} failed checks: {why}",
                        server.cfg.addr
                    );
                    flipped(&flips, &name, &server, false);
                }
            }
        }
    }
}

fn flipped(flips: &Option<UnboundedSender<Command>>, backend: &str, server: &ServerState, up: bool) {
    if let Some(tx) = flips {
        let _ = tx.send(Command::ServerHealth { backend: backend.into(), addr: server.cfg.addr, up });
    }
}

/// Starts the checks of every server of every backend that has them, and
/// of servers added later. `flips`, if given, gets every state change.
pub fn start(backends: &Arc<Backends>, flips: Option<UnboundedSender<Command>>) {
    let rt = tokio::runtime::Handle::current();
    for b in &backends.list {
        if let Some(hc) = &b.health {
            for s in b.servers().iter() {
                rt.spawn(run(backends.clone(), b.index, s.clone(), hc.clone(), flips.clone()));
            }
        }
    }
    let weak = Arc::downgrade(backends);
    backends.on_add(move |b: &BackendRt, s: Arc<ServerState>| {
        if let (Some(hc), Some(all)) = (&b.health, weak.upgrade()) {
            rt.spawn(run(all, b.index, s, hc.clone(), flips.clone()));
        }
    });
}
