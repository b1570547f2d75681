//! The eBPF object: one process (the supervisor) owns it. It takes the
//! pin-path lock, loads the maps (and, for the kernel data plane, the
//! verdict program), pins them under `pin_path`, writes the instance's
//! metadata next to the lock, and removes all of it when it stops. Every
//! process that serves connections opens the pins ([`super::maps`]).

use std::{
    fs,
    path::{Path, PathBuf},
};

pub use super::meta::{Meta, run_file};
use super::{KernelError, io_err, open, programs::typed_program};
use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::{SchedClassifier, SkSkb, SockOps, Xdp, XdpMode},
};
use lb_common::conn::FrontendKey;
use lb_common::maps::{
    FRONTENDS, LINK_PACKET_PREFIX, LINK_SETUP, PINNED, PROG_GUARD, PROG_PACKET, PROG_PACKET_OUT, PROG_SETUP,
    PROG_VERDICT, SPLICE,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn check_bpffs(pin_path: &Path) -> Result<(), KernelError> {
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    match rustix::fs::statfs(parent) {
        Ok(st) if st.f_type == BPF_FS_MAGIC => Ok(()),
        _ => Err(KernelError::BpffsMissing(parent.to_owned())),
    }
}

/// Takes an exclusive lock for `pin_path`, so two instances never share pins.
fn lock_pin_path(run_dir: &Path, pin_path: &Path) -> Result<super::lock::Lock, KernelError> {
    let lock = run_file(run_dir, pin_path, "lock");
    match super::lock::take(&lock).map_err(io_err(format!("opening {}", lock.display())))? {
        Ok(l) => Ok(l),
        Err(pid) => Err(KernelError::PinPathBusy { path: pin_path.to_owned(), lock, pid }),
    }
}

/// What to load.
pub struct Spec<'a> {
    pub pin_path: &'a Path,
    /// Directory of the lock and metadata files.
    pub run_dir: &'a Path,
    /// The capacities of the maps lb sizes.
    pub capacities: lb_common::maps::Capacities,
    /// Load and attach the verdict (kernel data plane), or only the maps.
    pub program: bool,
    /// Backend names, for `lb stats`.
    pub backends: Vec<String>,
}

/// The loaded object, owned by one process.
pub struct Objects {
    pin_path: PathBuf,
    run_dir: PathBuf,
    /// Owns the programs (and the verdict's attachment) and the maps.
    ebpf: Option<aya::Ebpf>,
    /// The pin-path lock: while this process holds it, the pins are its own
    /// to remove ([`Self::close`]).
    lock: Option<super::lock::Lock>,
    /// What is recorded next to the pins.
    meta: Meta,
}

impl Objects {
    /// Loads the maps, and with `spec.program` the verdict attached to
    /// `LB_SPLICE`; pins everything under `spec.pin_path`.
    pub fn load(spec: Spec<'_>) -> Result<Self, KernelError> {
        let Spec { pin_path, run_dir, capacities, program, backends } = spec;
        check_bpffs(pin_path)?;
        let lock = lock_pin_path(run_dir, pin_path)?;
        // We hold the lock: whatever is pinned there was left by a dead
        // instance. (An empty directory is a service's, made for lb.)
        if fs::read_dir(pin_path).is_ok_and(|mut d| d.next().is_some()) {
            log::warn!(
                "removing stale pins under {} left by an earlier lb that did not stop cleanly",
                pin_path.display()
            );
            remove_pins(pin_path);
        }
        let mut loader = EbpfLoader::new();
        for (name, capacity) in capacities.by_map() {
            loader.map_max_entries(name, capacity.max(1));
        }
        let tiny = test_capacities();
        for (name, capacity) in &tiny {
            loader.map_max_entries(name, *capacity);
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;

        fs::create_dir_all(pin_path).map_err(io_err(format!("creating {}", pin_path.display())))?;
        let result = (|| {
            for name in PINNED {
                let map =
                    ebpf.map(name).ok_or(KernelError::Program(format!("map {name} missing from the eBPF object")))?;
                let path = pin_path.join(name);
                map.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
            }
            if !program {
                return Ok(());
            }
            let splice: SockHash<MapData, u64> = open(pin_path, SPLICE)?;
            let prog: &mut SkSkb = typed_program(&mut ebpf, PROG_VERDICT)?;
            prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_VERDICT}: {e}")))?;
            prog.attach(splice.fd())
                .map_err(|e| KernelError::Program(format!("attaching {PROG_VERDICT} to {SPLICE}: {e}")))?;
            let path = pin_path.join(PROG_VERDICT);
            prog.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
            Ok(())
        })();
        if let Err(e) = result {
            drop(ebpf);
            remove_pins(pin_path);
            return Err(e);
        }
        let meta = Meta {
            pid: std::process::id(),
            dataplane: if program { "kernel" } else { "userspace" }.into(),
            backends,
            layout: lb_common::maps::layout(),
            ebpf: crate::EBPF_SHA256.into(),
            listen: Vec::new(),
            fill: super::fill::calibrate(pin_path),
        };
        meta.write(run_dir, pin_path);
        Ok(Self {
            pin_path: pin_path.to_owned(),
            run_dir: run_dir.to_owned(),
            ebpf: Some(ebpf),
            lock: Some(lock),
            meta,
        })
    }

    /// Takes over the object a running instance of an earlier binary
    /// pinned at `pin_path` (`lb upgrade`): the maps stay as they are, and
    /// this binary's programs are loaded on them, not attached yet. Fails,
    /// changing nothing, unless the metadata and every pin are there and
    /// the verifier takes the programs; the caller compares the metadata's
    /// `layout` with its own before it uses the maps. The pin-path lock is
    /// still the old instance's: see [`Self::take_lock`].
    pub fn adopt(run_dir: &Path, pin_path: &Path) -> Result<(Self, Meta), KernelError> {
        check_bpffs(pin_path)?;
        let meta = read_meta(run_dir, pin_path)?;
        let ebpf = super::programs::load_on_pins(pin_path)?;
        // Not ours to remove until the lock is (`take_lock`): a new binary
        // that fails before must leave the running instance's pins alone.
        let me = Self {
            pin_path: pin_path.to_owned(),
            run_dir: run_dir.to_owned(),
            ebpf: Some(ebpf),
            lock: None,
            meta: meta.clone(),
        };
        Ok((me, meta))
    }

    /// Takes the pin-path lock of an adopted object once the old instance
    /// has let it go (waiting up to `within`), puts this binary's programs
    /// in place of the old ones ([`super::programs::install`]; if that
    /// fails, the old ones run on and the error says so), and records this
    /// process in the metadata.
    pub fn take_lock(&mut self, meta: Meta, within: std::time::Duration) -> Result<(), KernelError> {
        let deadline = std::time::Instant::now() + within;
        let lock = loop {
            match lock_pin_path(&self.run_dir, &self.pin_path) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        self.lock = Some(lock);
        self.meta = Meta { pid: std::process::id(), ..meta };
        let installed = self.install();
        self.meta.write(&self.run_dir, &self.pin_path);
        installed
    }

    /// Takes over the object of an instance whose supervisor is gone while
    /// its holders keep its connections (`lb run` after a crash): takes the
    /// pin-path lock, loads this binary's programs on the pinned maps and
    /// puts them in place of the old ones, and records this process in the
    /// metadata. The caller checked `meta` (layout, data plane) first.
    pub fn adopt_orphaned(run_dir: &Path, pin_path: &Path, meta: Meta) -> Result<Self, KernelError> {
        check_bpffs(pin_path)?;
        let lock = lock_pin_path(run_dir, pin_path)?;
        let ebpf = super::programs::load_on_pins(pin_path)?;
        // The XDP guard's attachments were links of the dead process: gone
        // with it. Its owner attaches the guard anew if configured.
        let _ = fs::remove_file(pin_path.join(PROG_GUARD));
        let mut me = Self {
            pin_path: pin_path.to_owned(),
            run_dir: run_dir.to_owned(),
            ebpf: Some(ebpf),
            lock: Some(lock),
            meta: Meta { pid: std::process::id(), ..meta },
        };
        me.install()?;
        me.meta.write(run_dir, pin_path);
        Ok(me)
    }

    /// [`super::programs::install`], recording the object's hash on success.
    fn install(&mut self) -> Result<(), KernelError> {
        let ebpf = self.ebpf.as_mut().ok_or(KernelError::Program("the eBPF object is closed".into()))?;
        match super::programs::install(ebpf, &self.pin_path) {
            Ok(done) => {
                log::info!(
                    "this binary's eBPF programs are in place (object sha256 {}): verdict {}, sock_ops {}",
                    crate::EBPF_SHA256,
                    done.verdict.map_or("not attached".into(), |id| format!("id {id}")),
                    done.setup.map_or("not attached".into(), |id| format!("id {id}")),
                );
                self.meta.ebpf = crate::EBPF_SHA256.into();
                Ok(())
            }
            Err(e) => Err(KernelError::Program(format!(
                "putting this binary's eBPF programs in place: {e}; the earlier ones (object sha256 {}) run on",
                if self.meta.ebpf.is_empty() { "unknown" } else { &self.meta.ebpf }
            ))),
        }
    }

    /// Records where the frontends listen (for a takeover after a crash).
    pub fn record_listen(&mut self, listen: &[std::net::SocketAddr]) {
        self.meta.listen = listen.to_vec();
        self.meta.write(&self.run_dir, &self.pin_path);
    }

    /// Hands the object to the instance of a new binary (`lb upgrade`):
    /// the pins, the attached verdict and the metadata stay; the lock is
    /// released at once.
    pub fn leave(&mut self) {
        if let Some(ebpf) = self.ebpf.take() {
            // Dropping it would detach the verdict from LB_SPLICE.
            std::mem::forget(ebpf);
        }
        self.lock = None;
    }

    /// Loads the `sock_ops` program that splices sockets at `ESTABLISHED`,
    /// makes the clients of the frontends at `listen` (in this process's
    /// network namespace) redirect targets at accept, and attaches it to
    /// this process's cgroup (v2) through a link pinned next to the maps.
    /// Must run before the frontends listen: a client accepted before it
    /// is not a target, and its server would be spliced toward nothing.
    /// Returns the cgroup.
    pub fn attach_setup(&mut self, listen: &[std::net::SocketAddr]) -> Result<PathBuf, KernelError> {
        let ebpf = self.ebpf.as_mut().ok_or(KernelError::Program("the eBPF object is closed".into()))?;
        let ns = super::sys::netns_cookie().map_err(io_err("reading the network namespace's cookie"))?;
        let mut fronts: HashMap<MapData, FrontendKey, u64> = open(&self.pin_path, FRONTENDS)?;
        for a in listen {
            let ip = if a.ip().is_unspecified() { [0; 16] } else { crate::addr::ip16(a.ip()) };
            let key = FrontendKey { ip, port: a.port(), _pad: 0 };
            fronts.insert(key, ns, 0).map_err(|source| KernelError::Map { name: FRONTENDS, source })?;
        }
        let prog: &mut SockOps = typed_program(ebpf, PROG_SETUP)?;
        prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_SETUP}: {e}")))?;
        let path = self.pin_path.join(PROG_SETUP);
        prog.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        let cgroup = super::link::own_cgroup().map_err(io_err("finding lb's cgroup"))?;
        let fd = prog.fd().map_err(|e| KernelError::Program(format!("{PROG_SETUP}: {e}")))?;
        // The workers take the link's pin for the program's attachment.
        let link = self.pin_path.join(LINK_SETUP);
        super::link::attach_pinned(std::os::fd::AsFd::as_fd(fd), &cgroup, &link)
            .map_err(io_err(format!("attaching {PROG_SETUP} to cgroup {}", cgroup.display())))?;
        Ok(cgroup)
    }

    /// Loads the packet plane's TC programs and attaches them (tcx links) to
    /// each of `interfaces`: `lb_packet` on ingress, and `lb_packet_out` on
    /// egress of every interface but loopback (whose ingress sees what
    /// leaves). Each link is pinned next to the maps (`lb_packet_<ifindex>`,
    /// `lb_packet_out_<ifindex>`): joined connections outlive every lb
    /// process while the pins stay, and go with them. Returns the
    /// interfaces it is on: an interface other than loopback that refuses
    /// is left out (with a warning), and its connections stay on sockmap.
    pub fn attach_packet(&mut self, interfaces: &[String]) -> Result<Vec<String>, KernelError> {
        use aya::programs::TcAttachType;
        let ebpf = self.ebpf.as_mut().ok_or(KernelError::Program("the eBPF object is closed".into()))?;
        for name in [PROG_PACKET, PROG_PACKET_OUT] {
            let prog: &mut SchedClassifier = typed_program(ebpf, name)?;
            prog.load().map_err(|e| KernelError::Program(format!("loading {name}: {e}")))?;
            let path = self.pin_path.join(name);
            prog.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        }
        let mut attached = Vec::new();
        for i in interfaces {
            let Some(ifindex) = super::sys::interface_index(i) else { continue };
            let mut attach = || {
                let ingress = typed_program(ebpf, PROG_PACKET)?;
                tcx(ingress, i, TcAttachType::Ingress, &self.pin_path.join(format!("{LINK_PACKET_PREFIX}{ifindex}")))?;
                if i != "lo" {
                    let egress = typed_program(ebpf, PROG_PACKET_OUT)?;
                    let path = self.pin_path.join(format!("{LINK_PACKET_PREFIX}out_{ifindex}"));
                    tcx(egress, i, TcAttachType::Egress, &path)?;
                }
                Ok::<_, KernelError>(())
            };
            match attach() {
                Ok(()) => attached.push(i.clone()),
                // Its connections stay on sockmap: the join finds no arrival there.
                Err(e) if i != "lo" => log::warn!("packet plane: not on {i}: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(attached)
    }

    /// Loads the XDP guard and attaches it to each of `interfaces`, natively
    /// where the driver can, generically otherwise; pins it. Returns the
    /// mode of each. Detached when the object is closed.
    pub fn attach_guard(&mut self, interfaces: &[String]) -> Result<Vec<(String, &'static str)>, KernelError> {
        let ebpf = self.ebpf.as_mut().ok_or(KernelError::Program("the eBPF object is closed".into()))?;
        let prog: &mut Xdp = typed_program(ebpf, PROG_GUARD)?;
        prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_GUARD}: {e}")))?;
        let mut modes = Vec::new();
        for i in interfaces {
            let mode = match prog.attach(i, XdpMode::Driver) {
                Ok(_) => "native",
                Err(native) => {
                    prog.attach(i, XdpMode::Skb).map_err(|e| {
                        KernelError::Program(format!("attaching {PROG_GUARD} to {i}: {e} (native mode: {native})"))
                    })?;
                    "generic"
                }
            };
            modes.push((i.clone(), mode));
        }
        let path = self.pin_path.join(PROG_GUARD);
        prog.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        Ok(modes)
    }

    /// Detaches and unloads the program and, if the pins are this
    /// process's (it holds the lock), removes them, the metadata and the
    /// lock file.
    pub fn close(&mut self) {
        drop(self.ebpf.take());
        if let Some(lock) = self.lock.take() {
            remove_pins(&self.pin_path);
            let _ = fs::remove_file(run_file(&self.run_dir, &self.pin_path, "json"));
            // Still held by us, so nobody waits on it; the next start makes a new one.
            let _ = fs::remove_file(run_file(&self.run_dir, &self.pin_path, "lock"));
            drop(lock);
        }
    }

    /// Removes the pins, metadata and lock file left at `pin_path` by an
    /// instance that is gone (`lb stop` after its holders ended). `Ok(false)`:
    /// there was nothing to remove.
    pub fn remove_stale(run_dir: &Path, pin_path: &Path) -> Result<bool, KernelError> {
        let meta = run_file(run_dir, pin_path, "json");
        if !pin_path.exists() && !meta.exists() {
            return Ok(false);
        }
        let lock = lock_pin_path(run_dir, pin_path)?;
        remove_pins(pin_path);
        let _ = fs::remove_file(meta);
        let _ = fs::remove_file(&lock.path);
        Ok(true)
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        self.close();
    }
}

/// The metadata an instance wrote for `pin_path`.
fn read_meta(run_dir: &Path, pin_path: &Path) -> Result<Meta, KernelError> {
    Meta::read(run_dir, pin_path).ok_or_else(|| {
        KernelError::Program(format!("no instance metadata at {}", run_file(run_dir, pin_path, "json").display()))
    })
}

/// Test hook (`LB_TEST_MAP_ENTRIES=LB_TARGET:4,LB_CONN:8`): these maps get
/// these capacities instead of the configuration's, so that a test can
/// fill them with a few connections.
fn test_capacities() -> Vec<(String, u32)> {
    let Ok(spec) = std::env::var("LB_TEST_MAP_ENTRIES") else { return Vec::new() };
    let tiny: Vec<(String, u32)> = spec
        .split(',')
        .filter_map(|e| {
            let (name, n) = e.split_once(':')?;
            Some((name.trim().to_owned(), n.trim().parse::<u32>().ok()?.max(1)))
        })
        .collect();
    log::warn!("LB_TEST_MAP_ENTRIES: map capacities {tiny:?} (a test setting)");
    tiny
}

/// Attaches `prog` to `iface` (a tcx link, after the programs already
/// there) and pins the link at `path`.
fn tcx(
    prog: &mut SchedClassifier,
    iface: &str,
    at: aya::programs::TcAttachType,
    path: &Path,
) -> Result<(), KernelError> {
    use aya::programs::{LinkOrder, links::FdLink, tc::TcAttachOptions};
    let fail = |e: &dyn std::fmt::Display| KernelError::Program(format!("attaching to {iface} ({at:?}): {e}"));
    let id =
        prog.attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default())).map_err(|e| fail(&e))?;
    let link = prog.take_link(id).map_err(|e| fail(&e))?;
    let fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| fail(&e))?;
    fd.pin(path).map(drop).map_err(|source| KernelError::Pin { path: path.to_owned(), source })
}

/// Removes lb's pins under `pin_path` and the directory if it is then empty.
fn remove_pins(pin_path: &Path) {
    // The links first: removing a link's pin detaches its program.
    if let Ok(dir) = fs::read_dir(pin_path) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(LINK_PACKET_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for name in [&LINK_SETUP].into_iter().chain(PINNED.iter()).chain([
        &PROG_VERDICT,
        &PROG_SETUP,
        &PROG_GUARD,
        &PROG_PACKET,
        &PROG_PACKET_OUT,
    ]) {
        let _ = fs::remove_file(pin_path.join(name));
    }
    let _ = fs::remove_dir(pin_path);
}
