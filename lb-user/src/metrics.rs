//! Prometheus text endpoint (`metrics_listen`, path `/metrics`), built from
//! the same pinned maps as `lb stats`, so it covers every worker.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::report::Report;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The exposition text of a report.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let t = &r.totals;
    let plain = |v: u64| vec![(String::new(), v)];
    metric("lb_connections_active", "gauge", "Client connections open now.", plain(t.active));
    metric("lb_connections_total", "counter", "Client connections accepted.", plain(t.total));
    metric(
        "lb_rejected_total",
        "counter",
        "Clients closed without a server, by reason.",
        vec![
            ("{reason=\"no_source_port\"}".into(), t.no_source_port),
            ("{reason=\"queue\"}".into(), t.queue_rejected),
            ("{reason=\"no_server_up\"}".into(), t.no_server_up),
            (
                "{reason=\"unreachable\"}".into(),
                t.rejected.saturating_sub(t.no_source_port + t.queue_rejected + t.no_server_up),
            ),
        ],
    );
    metric("lb_queued", "gauge", "Clients waiting for a server slot.", plain(t.queued));
    metric("lb_idle_closed_total", "counter", "Connections closed by timeouts.idle.", plain(t.idle_closed));
    metric("lb_workers", "gauge", "Worker processes publishing stats.", plain(r.workers.len() as u64));
    let srv = |f: &dyn Fn(&crate::report::ServerRow) -> u64| {
        r.servers
            .iter()
            .map(|s| (format!("{{backend=\"{}\",server=\"{}\"}}", esc(&s.backend), s.addr), f(s)))
            .collect::<Vec<_>>()
    };
    metric("lb_server_up", "gauge", "1 when the server takes new connections.", srv(&|s| u64::from(s.state == "up")));
    metric("lb_server_weight", "gauge", "Server weight.", srv(&|s| u64::from(s.weight)));
    metric("lb_server_active", "gauge", "Connections to the server open now.", srv(&|s| s.active));
    metric("lb_server_connections_total", "counter", "Connections made to the server.", srv(&|s| s.total));
    metric("lb_server_bytes_in_total", "counter", "Bytes client to server.", srv(&|s| s.bytes_in));
    metric("lb_server_bytes_out_total", "counter", "Bytes server to client.", srv(&|s| s.bytes_out));
    metric("lb_server_connect_failures_total", "counter", "Failed connect attempts.", srv(&|s| s.connect_failures));
    let src = |f: &dyn Fn(&crate::report::SourceRow) -> u64| {
        r.sources.iter().map(|s| (format!("{{source=\"{}\",server=\"{}\"}}", s.ip, s.server), f(s))).collect()
    };
    metric("lb_source_ports_in_use", "gauge", "Ports in use per source address and server.", src(&|s| s.ports_in_use));
    metric("lb_source_exhausted_total", "counter", "Connects refused for lack of a local port.", src(&|s| s.exhausted));
    let c = &r.counters;
    metric(
        "lb_kernel_bytes_redirected_total",
        "counter",
        "Bytes spliced by the eBPF verdict.",
        plain(c.bytes_redirected),
    );
    metric("lb_kernel_skbs_redirected_total", "counter", "skbs spliced by the eBPF verdict.", plain(c.skbs_redirected));
    metric("lb_kernel_spliced_sockets", "gauge", "Sockets in the splice map.", plain(c.spliced_sockets));
    o
}

/// Binds `addr` (an error now if it is busy) and serves GET /metrics.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("metrics_listen {addr}"))
}

pub fn serve(l: TcpListener, pin_path: PathBuf) -> tokio::task::JoinHandle<()> {
    if let Ok(a) = l.local_addr() {
        log::info!("metrics on http://{a}/metrics");
    }
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let pin_path = pin_path.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf[n..])).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(k)) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if !req.starts_with("GET ") {
                    ("405 Method Not Allowed", "only GET\n".to_owned())
                } else if path != "/metrics" {
                    ("404 Not Found", "see /metrics\n".to_owned())
                } else {
                    match crate::report::read(&pin_path) {
                        Ok(r) => ("200 OK", render(&r)),
                        Err(e) => ("503 Service Unavailable", format!("no pinned maps: {e}\n")),
                    }
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    })
}
