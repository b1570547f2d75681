//! From the file as written to a [`Config`]: each part checked where it is
//! written, every error naming the key and its line.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use toml::Spanned;

use super::{
    BackendConfig, Config, ConfigError, FrontendConfig, HealthCheck, MAX_DURATION, MAX_WEIGHT, MAX_WORKERS,
    MIN_WORKER_TIMEOUT, Overrides, SendProxy, ServerConfig, SniRoutes, SourcePool, Timeouts,
    error::Locator,
    host::Host,
    memory, pool,
    raw::{self, DurationKey, HumanDuration, RawConfig},
    splice, unescape,
};
use crate::addr::ServerAddr;

pub fn validate(raw: RawConfig, loc: &Locator<'_>, host: &dyn Host, o: &Overrides) -> Result<Config, ConfigError> {
    if raw.frontend.is_empty() {
        return Err(loc.err(0, "no [[frontend]]: at least one is needed"));
    }
    if raw.backend.is_empty() {
        return Err(loc.err(0, "no [[backend]]: at least one is needed"));
    }
    let workers = match (o.workers, &raw.workers) {
        (Some(w), _) => w,
        (None, None) => 1,
        (None, Some(w)) => {
            let v = *w.get_ref();
            if v == 0 || v > MAX_WORKERS {
                return Err(loc.at(w, format!("workers = {v}: must be between 1 and {MAX_WORKERS}")));
            }
            v
        }
    };
    let kernel_memory = super::size::kernel_memory(loc, &raw.kernel_memory)?;
    let connect_attempts = match &raw.connect_attempts {
        None => 3,
        Some(a) if *a.get_ref() == 0 => return Err(loc.at(a, "connect_attempts = 0: must be at least 1")),
        Some(a) => *a.get_ref(),
    };
    let send_buffer = super::size::send_buffer(loc, &raw.send_buffer)?;
    let splice_queue_limit = super::size::splice_queue_limit(loc, &raw.splice_queue_limit, kernel_memory)?;
    let defaults = Timeouts::default();
    let t = &raw.timeouts;
    let timeouts = Timeouts {
        connect: duration(loc, "timeouts.connect", &t.connect, defaults.connect)?,
        queue: duration(loc, "timeouts.queue", &t.queue, defaults.queue)?,
        idle: duration(loc, "timeouts.idle", &t.idle, defaults.idle)?,
        worker: duration(loc, "timeouts.worker", &t.worker, defaults.worker)?,
        client_hello: duration(loc, "timeouts.client_hello", &t.client_hello, defaults.client_hello)?,
    };
    if let Some(w) = &t.worker
        && timeouts.worker < MIN_WORKER_TIMEOUT
    {
        return Err(loc.at(
            w,
            format!(
                "timeouts.worker = \"{}\": at least {MIN_WORKER_TIMEOUT:?} (workers publish their heartbeat every 100 ms)",
                w.get_ref().text
            ),
        ));
    }
    let default_pool =
        pool::parse(loc, host, ("source_pool", "source_port_range"), &raw.source_pool, &raw.source_port_range)?;
    let mut backends = Vec::with_capacity(raw.backend.len());
    let mut names = HashSet::new();
    for b in &raw.backend {
        let be = backend(loc, host, b, &default_pool, raw.source_pool.as_ref())?;
        if !names.insert(be.name.clone()) {
            return Err(loc.at(&b.name, format!("backend.name: duplicate backend \"{}\"", be.name)));
        }
        backends.push(be);
    }
    let guard = raw.guard.as_ref().map(|g| super::guard::validate(loc, host, g)).transpose()?;
    let dataplane = o.dataplane.unwrap_or(raw.dataplane);
    let shape = memory::Shape {
        maxconn: 0,
        workers,
        frontends: raw.frontend.len() as u32,
        servers: backends.iter().map(|b| b.servers.len() as u32).sum(),
        pairs: backends.iter().map(|b| b.servers.len() as u32 * b.pool.addrs.len().max(1) as u32).sum(),
        largest_pool: backends.iter().map(|b| b.pool.addrs.len() as u32).max().unwrap_or(0).max(1),
        kernel: dataplane != super::DataplaneMode::Userspace,
        guard: guard.is_some(),
        packet: splice::any_packet(&raw),
        cpus: host.possible_cpus(),
    };
    let largest_pool = raw
        .backend
        .iter()
        .filter_map(|b| b.source_pool.as_ref())
        .chain(raw.source_pool.as_ref())
        .max_by_key(|p| p.get_ref().len());
    let blame =
        memory::Blame { kernel_memory: raw.kernel_memory.as_ref(), maxconn: raw.maxconn.as_ref(), pool: largest_pool };
    let joined_only = shape.kernel && splice::all_packet(&raw);
    let maxconn = memory::maxconn(loc, host, &blame, kernel_memory, shape, joined_only)?;
    let default_splice = match &raw.splice {
        None => super::Splice::default(),
        Some(v) => splice::parse(loc, "splice", v)?,
    };
    let frontends = frontends(loc, &raw.frontend, &backends, maxconn, default_splice)?;
    let maxconn = o.maxconn.map_or(maxconn, |cap| maxconn.min(cap));
    let metrics_listen = match &raw.metrics_listen {
        None => None,
        Some(m) => Some(
            m.get_ref()
                .parse::<SocketAddr>()
                .map_err(|_| loc.at(m, format!("metrics_listen: \"{}\" is not an ip:port address", m.get_ref())))?,
        ),
    };
    listeners(loc, host, &raw, &frontends, metrics_listen)?;
    let pin_path = raw.pin_path.unwrap_or_else(|| PathBuf::from(super::DEFAULT_PIN_PATH));
    let runtime_dir = match raw.runtime_dir {
        Some(d) if !d.get_ref().is_absolute() => {
            return Err(loc.at(&d, format!("runtime_dir = \"{}\": must be an absolute path", d.get_ref().display())));
        }
        Some(d) => d.into_inner(),
        None => lb_common::files::default_run_dir(),
    };
    Ok(Config {
        control_socket: raw
            .control_socket
            .unwrap_or_else(|| lb_common::files::run_file(&runtime_dir, &pin_path, "sock")),
        runtime_dir,
        access_log: raw.access_log,
        metrics_listen,
        dataplane,
        pin_path,
        workers,
        maxconn,
        connect_attempts,
        send_buffer,
        splice_queue_limit,
        kernel_memory,
        memory: memory::Shape { maxconn, ..shape },
        timeouts,
        frontends,
        backends,
        guard,
    })
}

/// A duration key's value, or `default` when absent: more than 0, at most
/// [`MAX_DURATION`]. `key` names it in errors (`timeouts.idle`).
fn duration(loc: &Locator<'_>, key: &str, value: &DurationKey, default: Duration) -> Result<Duration, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let HumanDuration { value, text } = v.get_ref();
    if value.is_zero() {
        return Err(loc.at(v, format!("{key}: must be greater than 0")));
    }
    if *value > MAX_DURATION {
        return Err(loc.at(v, format!("{key} = \"{text}\": at most 365 days")));
    }
    Ok(*value)
}

fn check_name(loc: &Locator<'_>, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let n = name.get_ref();
    let ok = !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(loc.at(name, format!("{key}: \"{n}\" must be 1-64 characters of [A-Za-z0-9._-]"))) }
}

fn backend(
    loc: &Locator<'_>,
    host: &dyn Host,
    b: &raw::Backend,
    default_pool: &SourcePool,
    global_pool: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Result<BackendConfig, ConfigError> {
    check_name(loc, &b.name, "backend.name")?;
    let name = b.name.get_ref();
    if b.servers.get_ref().is_empty() {
        return Err(loc.at(&b.servers, format!("backend \"{name}\": servers is empty; list at least one \"ip:port\"")));
    }
    let server_maxconn = match &b.server_maxconn {
        Some(m) if *m.get_ref() == 0 => {
            return Err(loc.at(m, format!("backend \"{name}\": server_maxconn = 0: must be at least 1")));
        }
        m => m.as_ref().map(|m| *m.get_ref()),
    };
    let mut servers: Vec<ServerConfig> = Vec::new();
    for entry in b.servers.get_ref() {
        let text = entry.get_ref().addr();
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| loc.at(entry, format!("backend \"{name}\": servers: \"{text}\" is not an ip:port address")))?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(loc.at(
                entry,
                format!("backend \"{name}\": servers: \"{addr}\" needs a concrete ip and a non-zero port"),
            ));
        }
        let addr = ServerAddr(addr);
        if servers.iter().any(|x| x.addr == addr) {
            return Err(loc.at(entry, format!("backend \"{name}\": servers: \"{addr}\" is listed twice")));
        }
        let maxconn = match entry.get_ref().maxconn() {
            Some(0) => {
                return Err(
                    loc.at(entry, format!("backend \"{name}\": server {addr}: maxconn = 0: must be at least 1"))
                );
            }
            Some(m) => Some(m),
            None => server_maxconn,
        };
        let weight = entry.get_ref().weight().unwrap_or(1);
        if weight > MAX_WEIGHT {
            return Err(loc.at(
                entry,
                format!("backend \"{name}\": server {addr}: weight = {weight}: must be between 0 and {MAX_WEIGHT}"),
            ));
        }
        servers.push(ServerConfig { addr, maxconn, weight });
    }
    if servers.iter().all(|s| s.weight == 0) {
        return Err(loc.at(
            &b.servers,
            format!(
                "backend \"{name}\": every server has weight 0, so every client would be refused; give one a weight \
                 above 0 (`lb server weight` can still set all to 0 at run time)"
            ),
        ));
    }
    let pool = if b.source_pool.is_some() || b.source_port_range.is_some() {
        let mut p = pool::parse(loc, host, ("source_pool", "source_port_range"), &b.source_pool, &b.source_port_range)?;
        if b.source_pool.is_none() {
            p.addrs = default_pool.addrs.clone();
        }
        p
    } else {
        default_pool.clone()
    };
    if !pool.addrs.is_empty() {
        for s in &servers {
            if !pool.addrs.iter().any(|a| a.is_ipv4() == s.addr.0.is_ipv4()) {
                let at = b.source_pool.as_ref().or(global_pool).map_or(0, |p| p.span().start);
                let family = if s.addr.0.is_ipv4() { "IPv4" } else { "IPv6" };
                return Err(loc.err(
                    at,
                    format!("backend \"{name}\": source_pool has no {family} address for server {}", s.addr),
                ));
            }
        }
    }
    let queue = match &b.queue {
        None => 1024,
        Some(q) if *q.get_ref() > 1 << 20 => {
            return Err(loc.at(q, format!("backend \"{name}\": queue = {}: at most 1048576", q.get_ref())));
        }
        Some(q) => *q.get_ref(),
    };
    let mut health = b.health.as_ref().map(|h| health(loc, name, h)).transpose()?;
    if let (Some(h), Some(SendProxy::V2)) = (&mut health, b.send_proxy) {
        // As HAProxy's check-send-proxy: the server expects a header first.
        h.send.splice(0..0, crate::proxy_protocol::V2_LOCAL);
    }
    Ok(BackendConfig { name: name.clone(), servers, pool, queue, balance: b.balance, health, send_proxy: b.send_proxy })
}

fn health(loc: &Locator<'_>, name: &str, h: &Spanned<raw::Health>) -> Result<HealthCheck, ConfigError> {
    let bad = |what: &str| loc.at(h, format!("backend \"{name}\": health: {what}"));
    let key = |k: &str| format!("backend \"{name}\": health.{k}");
    let raw = h.get_ref();
    let interval = duration(loc, &key("interval"), &raw.interval, Duration::from_secs(2))?;
    let timeout = duration(loc, &key("timeout"), &raw.timeout, interval)?;
    if raw.rise == 0 || raw.fall == 0 {
        return Err(bad("rise and fall must be at least 1"));
    }
    let send = unescape(raw.send.as_deref().unwrap_or("")).map_err(|e| bad(&format!("send: {e}")))?;
    let expect = unescape(raw.expect.as_deref().unwrap_or("")).map_err(|e| bad(&format!("expect: {e}")))?;
    Ok(HealthCheck { interval, timeout, rise: raw.rise, fall: raw.fall, send, expect })
}

/// What `lb run` would refuse about the listening addresses (frontends and
/// `metrics_listen`), each at its line: an address that is not this
/// host's, two that overlap (a wildcard and an address on one port), and,
/// when `host` probes, one that is busy now.
fn listeners(
    loc: &Locator<'_>,
    host: &dyn Host,
    raw: &RawConfig,
    frontends: &[FrontendConfig],
    metrics: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    let mut all: Vec<(String, SocketAddr, &Spanned<String>)> = frontends
        .iter()
        .zip(&raw.frontend)
        .map(|(f, r)| (format!("frontend \"{}\": listen", f.name), f.listen, &r.listen))
        .collect();
    if let (Some(m), Some(r)) = (metrics, &raw.metrics_listen) {
        all.push(("metrics_listen".to_owned(), m, r));
    }
    for (i, (what, addr, at)) in all.iter().enumerate() {
        if !addr.ip().is_unspecified() {
            super::host::require_local(loc, host, at, what, addr.ip())?;
        }
        if addr.port() == 0 {
            continue;
        }
        if let Some((other, o, _)) = all[..i].iter().find(|(_, o, _)| o.port() == addr.port() && overlap(*o, *addr)) {
            return Err(loc
                .at(*at, format!("{what}: {addr} overlaps {o} ({other}): both would listen on port {}", addr.port())));
        }
        if let Some(e) = host.bind_error(*addr) {
            return Err(loc.at(*at, format!("{what} {addr}: {e}")));
        }
    }
    Ok(())
}

/// Whether listeners on `a` and `b` (one port) take the same connections:
/// equal, or one a wildcard of the other's family (`[::]` is dual-stack
/// and takes IPv4 too).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, x: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a == b || covers(a, b) || covers(b, a)
}

/// A frontend's `sni` table: each pattern a host name or `*.` and one, each
/// backend one that exists.
fn sni_routes(
    loc: &Locator<'_>,
    frontend: &str,
    table: &Spanned<std::collections::BTreeMap<String, String>>,
    backends: &[BackendConfig],
) -> Result<SniRoutes, ConfigError> {
    let mut routes = SniRoutes::default();
    let mut seen = HashSet::new();
    if table.get_ref().is_empty() {
        return Err(loc.at(table, format!("frontend \"{frontend}\": sni is empty; name at least one server name")));
    }
    for (pattern, backend) in table.get_ref() {
        let at = |what: String| loc.at(table, format!("frontend \"{frontend}\": sni.\"{pattern}\": {what}"));
        let p = pattern.to_ascii_lowercase();
        let host = p.strip_prefix("*.").unwrap_or(&p);
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(at("not a host name or *.host.name pattern".into()));
        }
        if !seen.insert(p.clone()) {
            return Err(at("listed twice (names are case-insensitive)".into()));
        }
        let b = backends
            .iter()
            .position(|b| &b.name == backend)
            .ok_or_else(|| at(format!("no [[backend]] named \"{backend}\"")))?;
        routes.add(&p, b);
    }
    Ok(routes)
}

fn frontends(
    loc: &Locator<'_>,
    raw: &[raw::Frontend],
    backends: &[BackendConfig],
    global_maxconn: u32,
    default_splice: super::Splice,
) -> Result<Vec<FrontendConfig>, ConfigError> {
    let mut frontends = Vec::with_capacity(raw.len());
    let (mut names, mut listens) = (HashSet::new(), HashSet::new());
    for f in raw {
        check_name(loc, &f.name, "frontend.name")?;
        let name = f.name.get_ref();
        if !names.insert(name.as_str()) {
            return Err(loc.at(&f.name, format!("frontend.name: duplicate frontend \"{name}\"")));
        }
        let listen: SocketAddr = f.listen.get_ref().parse().map_err(|_| {
            loc.at(
                &f.listen,
                format!("frontend \"{name}\": listen: \"{}\" is not an ip:port address", f.listen.get_ref()),
            )
        })?;
        if listen.port() != 0 && !listens.insert(listen) {
            return Err(loc.at(&f.listen, format!("frontend \"{name}\": listen: {listen} is used twice")));
        }
        let backend = backends.iter().position(|b| &b.name == f.backend.get_ref()).ok_or_else(|| {
            loc.at(
                &f.backend,
                format!("frontend \"{name}\": backend: no [[backend]] named \"{}\"", f.backend.get_ref()),
            )
        })?;
        let maxconn = match &f.maxconn {
            None => None,
            Some(m) => {
                let v = *m.get_ref();
                if v == 0 || v > global_maxconn {
                    return Err(loc.at(
                        m,
                        format!(
                            "frontend \"{name}\": maxconn = {v}: must be between 1 and the global maxconn ({global_maxconn})"
                        ),
                    ));
                }
                Some(v)
            }
        };
        let first_byte_timeout = match &f.first_byte_timeout {
            Some(_) => Some(duration(
                loc,
                &format!("frontend \"{name}\": first_byte_timeout"),
                &f.first_byte_timeout,
                Duration::ZERO,
            )?),
            None => None,
        };
        let sni = match &f.sni {
            None => None,
            Some(table) => Some(sni_routes(loc, name, table, backends)?),
        };
        let splice = match &f.splice {
            None => default_splice,
            Some(v) => splice::parse(loc, &format!("frontend \"{name}\": splice"), v)?,
        };
        frontends.push(FrontendConfig {
            name: name.clone(),
            listen,
            backend,
            maxconn,
            first_byte_timeout,
            sni,
            splice,
        });
    }
    Ok(frontends)
}
