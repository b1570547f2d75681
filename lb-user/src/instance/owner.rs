//! What the supervisor runs besides its workers: the eBPF object and its
//! pins, the metrics endpoint and the control socket. Dropping the
//! [`Owner`] stops them and removes the pins and the socket.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    config::{Config, GuardConfig},
    control,
    dataplane::{self, Kind},
    kernel::object::{Meta, Objects},
    observe::metrics,
};

pub struct Owner {
    pub kind: Kind,
    objects: Option<Objects>,
    /// Where the metrics endpoint listens, if configured.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    control: Option<(tokio::task::JoinHandle<()>, crate::kernel::lock::Lock)>,
    control_path: PathBuf,
}

impl Owner {
    /// Starts everything, after the frontends are bound (at `listen`);
    /// requests to the control socket arrive on the returned channel.
    /// `adopted`: the object of an instance whose supervisor died, taken
    /// over with its holders (kernel plane, `lb_setup` already in its
    /// pinned link); otherwise it is loaded here.
    pub async fn start(
        cfg: &Config,
        listen: &[SocketAddr],
        adopted: Option<Objects>,
    ) -> anyhow::Result<(Self, mpsc::Receiver<control::Msg>)> {
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(metrics::bind(a).await?),
            None => None,
        };
        let fresh = adopted.is_none();
        let (kind, mut objects) = match adopted {
            Some(o) => (dataplane::Kind::Kernel, Some(o)),
            None => dataplane::load(cfg)?,
        };
        let no_setup = std::env::var_os("LB_TEST_NO_KERNEL_SETUP").is_some_and(|v| v == "1");
        if no_setup {
            log::warn!("LB_TEST_NO_KERNEL_SETUP=1: the workers insert every socket (a test setting)");
        }
        if let Some(o) = objects.as_mut() {
            o.record_listen(listen);
        }
        if fresh
            && kind == dataplane::Kind::Kernel
            && !no_setup
            && let Some(o) = objects.as_mut()
        {
            // The frontends do not listen yet (the workers listen once this
            // returns), so every client they accept is seen by the program.
            match o.attach_setup(listen) {
                Ok(cgroup) => {
                    log::info!("sock_ops attached to cgroup {}: the kernel splices at ESTABLISHED", cgroup.display())
                }
                Err(e) => log::warn!(
                    "kernel-side setup unavailable ({e}); the workers insert every socket into the maps themselves"
                ),
            }
        }
        if kind == dataplane::Kind::Kernel
            && cfg.packet_plane()
            && let Some(o) = objects.as_mut()
        {
            // Every interface of the namespace: a joined connection's
            // packets arrive where its peers' did, and leave toward them.
            // A connection whose handshake came in on an interface that
            // appeared later stays on sockmap (kept: path).
            let ifaces = crate::kernel::sys::interfaces().unwrap_or_else(|_| vec!["lo".to_owned()]);
            match o.attach_packet(&ifaces) {
                Ok(on) => log::info!("packet plane: TC program attached to {}", on.join(", ")),
                Err(e) => log::warn!("packet plane unavailable ({e}); its frontends' connections stay on sockmap"),
            }
        }
        if let Some(g) = &cfg.guard {
            let o = objects
                .as_mut()
                .context("[guard]: the XDP guard needs the eBPF object, which did not load (see the warning above)")?;
            for (i, mode) in o.attach_guard(&g.interfaces).context("[guard]")? {
                log::info!("guard: XDP attached to {i} ({mode} mode)");
            }
            guard::apply(&cfg.pin_path, g, listen).context("[guard]")?;
        }
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = metrics.map(|l| metrics::serve(l, cfg.pin_path.clone(), cfg.runtime_dir.clone()));
        let mut owner =
            Owner { kind, objects, metrics_addr, metrics, control: None, control_path: cfg.control_socket.clone() };
        let (tx, ctl) = mpsc::channel(16);
        owner.control = Some(control::listen(&owner.control_path, tx)?);
        Ok((owner, ctl))
    }

    /// Whether the pinned maps exist (the userspace plane may run without).
    pub fn maps(&self) -> bool {
        self.objects.is_some()
    }

    /// The instance of a new binary takes over (`lb upgrade`): the control
    /// socket, its lock and the metrics endpoint are let go at once; the
    /// pins, the attached verdict and the metadata stay for the new owner.
    pub fn hand_over(&mut self) {
        if let Some((task, lock)) = self.control.take() {
            task.abort();
            drop(lock);
        }
        if let Some(m) = self.metrics.take() {
            m.abort();
        }
        if let Some(o) = self.objects.as_mut() {
            o.leave();
        }
    }

    /// The owner of a new binary's instance (`lb upgrade`): takes the
    /// adopted object's lock once the old instance let it go, then binds the
    /// metrics endpoint (retrying while the old one closes it) and the
    /// control socket. Never fails: what cannot be had is logged, and the
    /// instance serves its connections without it.
    pub async fn adopted(
        cfg: &Config,
        kind: Kind,
        listen: &[SocketAddr],
        (mut objects, meta): (Objects, Meta),
    ) -> (Self, mpsc::Receiver<control::Msg>) {
        if let Err(e) = objects.take_lock(meta, HAND_OVER_WAIT) {
            log::error!("after the upgrade: {e}");
        }
        objects.record_listen(listen);
        let objects = Some(objects);
        let mut metrics = None;
        if let Some(a) = cfg.metrics_listen {
            let deadline = tokio::time::Instant::now() + HAND_OVER_WAIT;
            metrics = loop {
                match metrics::bind(a).await {
                    Ok(l) => break Some(l),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        log::error!("metrics after the upgrade: {e:#}");
                        break None;
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
        }
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = metrics.map(|l| metrics::serve(l, cfg.pin_path.clone(), cfg.runtime_dir.clone()));
        let mut owner =
            Owner { kind, objects, metrics_addr, metrics, control: None, control_path: cfg.control_socket.clone() };
        let (tx, ctl) = mpsc::channel(16);
        match control::listen(&owner.control_path, tx) {
            Ok(c) => owner.control = Some(c),
            Err(e) => log::error!("control socket after the upgrade: {e:#}"),
        }
        (owner, ctl)
    }
}

/// How long the new instance waits for the old one to let go of its lock
/// and endpoints.
const HAND_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some((task, lock)) = self.control.take() {
            // Only the instance holding the lock gets here: the socket and
            // the lock file are its own.
            task.abort();
            let _ = std::fs::remove_file(&self.control_path);
            let _ = std::fs::remove_file(&lock.path);
        }
        if let Some(m) = self.metrics.take() {
            m.abort();
        }
        if let Some(o) = self.objects.as_mut() {
            o.close();
        }
    }
}

/// The guard's side of the owner: filling and changing its maps.
pub mod guard {
    use std::{net::SocketAddr, path::Path};

    use lb_common::guard::GuardConf;

    use super::GuardConfig;
    use crate::{
        config::guard::parse_cidr,
        control::GuardCmd,
        kernel::guard::{GuardMaps, List},
    };

    /// Makes the pinned guard maps say what `g` says, rate-limiting SYNs to
    /// the ports of `listen`.
    pub fn apply(pin_path: &Path, g: &GuardConfig, listen: &[SocketAddr]) -> anyhow::Result<()> {
        let ports: Vec<u16> = listen.iter().map(|a| a.port()).collect();
        let conf = GuardConf { syn_rate: g.syn_rate, syn_burst: g.syn_burst };
        GuardMaps::open(pin_path)?.apply(&g.deny, &g.allow, conf, &ports)?;
        Ok(())
    }

    /// Carries out `lb guard …` on the pinned maps.
    pub fn command(pin_path: &Path, on: bool, cmd: &GuardCmd) -> Result<String, String> {
        if !on {
            return Err("no [guard] in this instance's configuration".into());
        }
        let mut maps = GuardMaps::open(pin_path).map_err(|e| e.to_string())?;
        let name = |l: &List| match l {
            List::Deny => "deny",
            List::Allow => "allow",
        };
        match cmd {
            GuardCmd::Show => {
                let c = maps.counters().map_err(|e| e.to_string())?;
                let show = |l: List| maps.list(l).iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
                let top: Vec<String> = maps.top(5).iter().map(|(a, n)| format!("{a} ({n})")).collect();
                Ok(format!(
                    "deny: {}\nallow: {}\npassed {} denied {} rate_limited {} unparsed {} fragments {}\n\
                     top dropped sources: {}",
                    show(List::Deny),
                    show(List::Allow),
                    c.passed,
                    c.denied,
                    c.rate_limited,
                    c.unparsed,
                    c.fragments,
                    top.join(", ")
                ))
            }
            GuardCmd::Add { list, cidr } => {
                let net = parse_cidr(cidr)?;
                match maps.add(*list, &net).map_err(|e| e.to_string())? {
                    true => Ok(format!("{net} added to the {} list", name(list))),
                    false => Ok(format!("{net} is already in the {} list", name(list))),
                }
            }
            GuardCmd::Remove { list, cidr } => {
                let net = parse_cidr(cidr)?;
                match maps.remove(*list, &net).map_err(|e| e.to_string())? {
                    true => Ok(format!("{net} removed from the {} list", name(list))),
                    false => Err(format!("{net} is not in the {} list", name(list))),
                }
            }
        }
    }
}
