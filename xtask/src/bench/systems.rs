//! The systems under test, each started in front of a backend address.

use std::net::SocketAddr;

use anyhow::bail;
use testkit::{Lb, external, lbproc};

/// One system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    /// The client talks to the backend itself: the floor for every figure.
    Direct,
    LbKernel,
    /// lb with `splice = "packet"`: connections joined at packet level.
    LbPacket,
    LbUserspace,
    Haproxy,
    /// HAProxy with `option splice-auto` (kernel splice(2) between sockets).
    HaproxySplice,
    /// nginx's `stream` module.
    Nginx,
}

impl System {
    pub const ALL: [System; 7] = [
        Self::Direct,
        Self::LbKernel,
        Self::LbPacket,
        Self::LbUserspace,
        Self::Haproxy,
        Self::HaproxySplice,
        Self::Nginx,
    ];

    /// One of lb's.
    pub fn is_lb(self) -> bool {
        matches!(self, Self::LbKernel | Self::LbPacket | Self::LbUserspace)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::LbKernel => "lb-kernel",
            Self::LbPacket => "lb-packet",
            Self::LbUserspace => "lb-userspace",
            Self::Haproxy => "haproxy",
            Self::HaproxySplice => "haproxy-splice",
            Self::Nginx => "nginx",
        }
    }
}

/// Connections one single-process proxy holds at most under the 20000-fd limit.
pub const SINGLE_PROCESS_CAP: usize = 9_000;
/// Connections one lb worker is given in the idle scenario.
const PER_LB_WORKER: usize = 8_000;

/// A running system: where clients connect, and its processes.
pub enum Running {
    Direct(SocketAddr),
    Lb(Lb),
    External(external::Process),
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Direct(a) => *a,
            Self::Lb(lb) => lb.addr,
            Self::External(p) => p.addr,
        }
    }

    /// Every process of the proxy (lb's workers and nginx's included); none for direct.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Self::Direct(_) => vec![],
            Self::Lb(lb) => lb.pids(),
            Self::External(p) => p.pids(),
        }
    }
}

/// Starts `sys` in front of `backend`; `hold`: sized for that many idle
/// connections (lb gets workers, the others are single processes).
pub fn start(sys: System, backend: SocketAddr, hold: Option<usize>) -> anyhow::Result<Running> {
    let external = |r: Result<external::Process, String>| r.map(Running::External).map_err(anyhow::Error::msg);
    match sys {
        System::Direct => Ok(Running::Direct(backend)),
        System::LbKernel | System::LbPacket | System::LbUserspace => {
            let plane = if sys == System::LbUserspace { "userspace" } else { "kernel" };
            let splice = if sys == System::LbPacket { "splice = \"packet\"\n" } else { "" };
            let (dir, pin_path) = lbproc::scratch();
            let (workers, pool) = match hold {
                Some(n) => (
                    n.div_ceil(PER_LB_WORKER).max(1),
                    "source_pool = [\"127.0.1.1\", \"127.0.1.2\", \"127.0.1.3\", \"127.0.1.4\"]",
                ),
                None => (1, ""),
            };
            let maxconn = workers * (PER_LB_WORKER + 1_000);
            // No splice_queue_limit: with the default, lb-kernel resets a
            // single iperf3 stream on loopback within a second (README,
            // "Performance"), and the bench measures throughput.
            // The kernel maps take about 2.8 KiB per connection and 4.5 MiB
            // per worker for the clients its listener's backlog may hold
            // (README, "Kernel memory").
            let kernel_memory = ((maxconn as u64 * 3 * 1024 + workers as u64 * (5 << 20)) >> 20) + 64;
            let cfg = format!(
                "dataplane = \"{plane}\"\n{splice}pin_path = \"{}\"\nworkers = {workers}\nmaxconn = {maxconn}\n\
                 kernel_memory = \"{kernel_memory}MiB\"\nsplice_queue_limit = \"0\"\naccess_log = false\n\n\
                 [[frontend]]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\nbackend = \"sink\"\n\n\
                 [[backend]]\nname = \"sink\"\nservers = [\"{backend}\"]\n{pool}\n",
                pin_path.display(),
            );
            let lb = Lb::launch("bench", dir, pin_path, &cfg);
            if lb.dataplane != plane {
                bail!("lb started the {} data plane, not {plane}", lb.dataplane);
            }
            if sys == System::LbPacket && !lb.pinned_stats()["packet"].is_object() {
                bail!("lb's packet plane did not start (its frontend fell back to sockmap)");
            }
            Ok(Running::Lb(lb))
        }
        System::Haproxy => external(external::haproxy(backend, false, SINGLE_PROCESS_CAP)),
        System::HaproxySplice => external(external::haproxy(backend, true, SINGLE_PROCESS_CAP)),
        System::Nginx => external(external::nginx_stream(backend)),
    }
}

/// What the map entries of one joined connection take in the kernel, in
/// bytes: two `LB_FLOWS` entries (a 40-byte key, a 128-byte value) and one
/// `LB_FLOW_CTL` entry (8 and 12 bytes), each in a hash map element with
/// its 40-byte header (`struct htab_elem`), key and value rounded up to 8
/// bytes. The maps are preallocated, so the slab does not show them.
pub const PACKET_MAP_BYTES_PER_CONN: f64 = (2 * (40 + 40 + 128) + (40 + 8 + 16)) as f64;

/// The packet plane's joins so far, and the connections it kept on
/// sockmap (all reasons): lb-packet only.
pub fn joins(running: &Running) -> Option<(u64, u64)> {
    let Running::Lb(lb) = running else { return None };
    if !lb.pinned_stats()["packet"].is_object() {
        return None;
    }
    lb.await_publication();
    let t = &lb.pinned_stats()["totals"];
    let kept = lbproc::PACKET_KEPT_REASONS.iter().map(|r| t[format!("packet_kept_{r}")].as_u64().unwrap_or(0)).sum();
    Some((t["packet_joined"].as_u64().unwrap_or(0), kept))
}
