//! The Prometheus endpoint (`metrics_listen`, path `/metrics`), built on
//! each scrape from the same pinned maps as `lb stats`, so it covers every
//! worker. Text from `prometheus-client`, HTTP from `hyper`; the maps are
//! read on a blocking thread.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{
    counters::{CounterKind, WorkerCounters},
    read::Report,
};
use crate::kernel::{maps::PinnedMaps, object::Meta};

/// Scrapes served at once; more wait for a slot.
const MAX_SCRAPES: usize = 16;
/// Time a scraper has to send its request and take the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

type Labels = Vec<(String, String)>;
/// One metric family being built: name, help, kind, samples.
type FamilyRows<'a> = (&'a str, &'a str, CounterKind, Vec<(Labels, u64)>);

/// Registers counters or gauges named `lb_<name>`: one metric, or a family
/// with one sample per label set.
fn family(r: &mut Registry, name: &str, help: &str, kind: CounterKind, rows: impl IntoIterator<Item = (Labels, u64)>) {
    // prometheus-client ends the help with a period itself.
    let help = help.trim().trim_end_matches('.');
    let rows: Vec<(Labels, u64)> = rows.into_iter().collect();
    let gauge = |v: u64| v.min(i64::MAX as u64) as i64;
    match (kind, rows.as_slice()) {
        (CounterKind::Counter, [(labels, v)]) if labels.is_empty() => {
            let c = Counter::<u64>::default();
            c.inc_by(*v);
            r.register(name, help, c);
        }
        (CounterKind::Gauge, [(labels, v)]) if labels.is_empty() => {
            let g = Gauge::<i64>::default();
            g.set(gauge(*v));
            r.register(name, help, g);
        }
        (CounterKind::Counter, _) => {
            let f = Family::<Labels, Counter>::default();
            for (labels, v) in rows {
                f.get_or_create(&labels).inc_by(v);
            }
            r.register(name, help, f);
        }
        (CounterKind::Gauge, _) => {
            let f = Family::<Labels, Gauge>::default();
            for (labels, v) in rows {
                f.get_or_create(&labels).set(gauge(v));
            }
            r.register(name, help, f);
        }
    }
}

/// The exposition text (OpenMetrics) of a report.
pub fn render(report: &Report) -> String {
    let mut r = Registry::with_prefix("lb");
    // Worker counters: one family per metric, fields sharing one by reason.
    let mut by_metric: Vec<FamilyRows<'_>> = Vec::new();
    for (f, v) in WorkerCounters::FIELDS.iter().zip(report.totals.values()) {
        let labels: Labels = f.reason.map(|r| vec![("reason".to_owned(), r.to_owned())]).unwrap_or_default();
        match by_metric.iter_mut().find(|m| m.0 == f.metric) {
            Some(m) => m.3.push((labels, v)),
            None => by_metric.push((f.metric, f.help, f.kind, vec![(labels, v)])),
        }
    }
    for (name, help, kind, rows) in by_metric {
        // Fields sharing a family (by reason): the help up to the reason.
        let help = if rows.len() > 1 { help.split_once(':').map_or(help, |(h, _)| h) } else { help };
        family(&mut r, name, help, kind, rows);
    }
    let one = |v: u64| vec![(Labels::new(), v)];
    family(
        &mut r,
        "workers",
        "Worker processes publishing stats.",
        CounterKind::Gauge,
        one(report.workers.len() as u64),
    );
    let server = |s: &super::read::ServerRow| -> Labels {
        vec![("backend".into(), s.backend.clone()), ("server".into(), s.addr.to_string())]
    };
    let servers = |f: &dyn Fn(&super::read::ServerRow) -> u64| -> Vec<(Labels, u64)> {
        report.servers.iter().map(|s| (server(s), f(s))).collect()
    };
    use CounterKind::{Counter as C, Gauge as G};
    family(
        &mut r,
        "server_up",
        "1 when the server takes new connections.",
        G,
        servers(&|s| u64::from(s.state == "up")),
    );
    family(&mut r, "server_weight", "Server weight.", G, servers(&|s| u64::from(s.weight)));
    family(&mut r, "server_active", "Connections to the server open now.", G, servers(&|s| s.active));
    family(&mut r, "server_connections", "Connections made to the server.", C, servers(&|s| s.total));
    family(&mut r, "server_bytes_in", "Bytes client to server.", C, servers(&|s| s.bytes_in));
    family(&mut r, "server_bytes_out", "Bytes server to client.", C, servers(&|s| s.bytes_out));
    family(&mut r, "server_connect_failures", "Failed connect attempts.", C, servers(&|s| s.connect_failures));
    let sources = |f: &dyn Fn(&super::read::SourceRow) -> u64| -> Vec<(Labels, u64)> {
        report
            .sources
            .iter()
            .map(|s| (vec![("source".into(), s.ip.clone()), ("server".into(), s.server.to_string())], f(s)))
            .collect()
    };
    family(
        &mut r,
        "source_ports_in_use",
        "Ports in use per source address and server.",
        G,
        sources(&|s| s.ports_in_use),
    );
    family(&mut r, "source_exhausted", "Connects refused for lack of a local port.", C, sources(&|s| s.exhausted));
    let k = &report.counters;
    family(&mut r, "kernel_bytes_redirected", "Bytes spliced by the eBPF verdict.", C, one(k.bytes_redirected));
    family(&mut r, "kernel_skbs_redirected", "skbs spliced by the eBPF verdict.", C, one(k.skbs_redirected));
    family(&mut r, "kernel_spliced_sockets", "Sockets in the splice map.", G, one(k.spliced_sockets));
    family(
        &mut r,
        "kernel_setups",
        "Server sockets the sock_ops program spliced at ESTABLISHED.",
        C,
        one(k.kernel_setups),
    );
    family(
        &mut r,
        "kernel_setup_failures",
        "Sockets the sock_ops program could not insert (userspace did).",
        C,
        one(k.kernel_setup_failures),
    );
    let maps = |f: &dyn Fn(&super::read::MapRow) -> Option<u64>| -> Vec<(Labels, u64)> {
        report.maps.iter().filter_map(|m| Some((vec![("map".to_owned(), m.map.clone())], f(m)?))).collect()
    };
    family(
        &mut r,
        "map_entries",
        "Entries in each map that fills with connections or servers.",
        G,
        maps(&|m| m.entries),
    );
    family(&mut r, "map_capacity", "Capacity of each such map (entries).", G, maps(&|m| Some(u64::from(m.capacity))));
    family(&mut r, "map_bytes", "Kernel memory each such map takes now (memlock).", G, maps(&|m| Some(m.bytes)));
    if let Some(g) = &report.guard {
        family(&mut r, "guard_passed", "Packets the XDP guard let through.", C, one(g.passed));
        family(&mut r, "guard_denied", "Packets the XDP guard dropped: source denied.", C, one(g.denied));
        family(
            &mut r,
            "guard_rate_limited",
            "SYNs the XDP guard dropped: over the source's rate.",
            C,
            one(g.rate_limited),
        );
        family(
            &mut r,
            "guard_unparsed",
            "Packets the XDP guard dropped: headers it does not read past to TCP.",
            C,
            one(g.unparsed),
        );
        family(
            &mut r,
            "guard_fragments",
            "Fragments other than the first the XDP guard let through after its lists.",
            C,
            one(g.fragments),
        );
        let rules = vec![
            (vec![("list".to_owned(), "deny".to_owned())], g.deny.len() as u64),
            (vec![("list".to_owned(), "allow".to_owned())], g.allow.len() as u64),
        ];
        family(&mut r, "guard_rules", "Entries in the XDP guard's lists.", G, rules);
    }
    let mut text = String::new();
    // Writing into a String does not fail.
    let _ = encode(&mut text, &r);
    text
}

/// Binds `addr` (an error now if it is busy).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("metrics_listen {addr}"))
}

/// Serves `GET /metrics` until the task is aborted. Accept errors (such as
/// running out of descriptors) are logged at most every 5 s and retried
/// after a pause, never the end of the endpoint.
pub fn serve(l: TcpListener, pin_path: PathBuf, run_dir: PathBuf) -> tokio::task::JoinHandle<()> {
    if let Ok(a) = l.local_addr() {
        log::info!("metrics on http://{a}/metrics");
    }
    let paths = Arc::new(Source { pin_path, run_dir, opened: std::sync::Mutex::new(None) });
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        let mut backoff = crate::observe::Backoff::new("metrics endpoint");
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let stream = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            };
            let paths = paths.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| scrape(req, paths.clone()));
                // One scrape per connection: answered, then closed.
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .timer(TokioTimer::new())
                    .header_read_timeout(SCRAPE_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await;
                drop(permit);
            });
        }
    })
}

/// Where scrapes read from: the pinned maps, opened at the first scrape
/// that finds them and kept open, so that a scrape takes no descriptor
/// besides its connection's (and still works when lb's are scarce).
struct Source {
    pin_path: PathBuf,
    run_dir: PathBuf,
    opened: std::sync::Mutex<Option<Arc<(PinnedMaps, Meta)>>>,
}

impl Source {
    fn report(&self) -> Result<Report, crate::kernel::KernelError> {
        let opened = {
            let mut o = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            match &*o {
                Some(m) => m.clone(),
                None => {
                    let maps = PinnedMaps::open(&self.pin_path)?;
                    let meta = Meta::read(&self.run_dir, &self.pin_path).unwrap_or_default();
                    o.insert(Arc::new((maps, meta))).clone()
                }
            }
        };
        super::read::read_from(&opened.0, &opened.1)
    }
}

async fn scrape(req: Request<Incoming>, paths: Arc<Source>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    if req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "see /metrics\n".into()));
    }
    let read = tokio::task::spawn_blocking(move || paths.report()).await;
    Ok(match read {
        Ok(Ok(report)) => {
            let mut r = reply(StatusCode::OK, render(&report));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        Ok(Err(e)) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("no pinned maps: {e}\n")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the maps failed: {e}\n")),
    })
}
