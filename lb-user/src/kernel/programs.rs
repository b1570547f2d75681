//! This binary's programs in place of those an earlier binary left running
//! on the same pinned maps (`lb upgrade`, and `lb run` taking over the
//! holders of an instance whose supervisor died). The maps stay: they hold
//! every live connection's sockets and records. The object is loaded with
//! each map taken from its pin (`EbpfLoader::map_pin_path`), its programs
//! checked by the verifier against those maps ([`load_on_pins`], which
//! changes nothing), then put in place ([`install`]):
//!
//! - the verdict is attached to `LB_SPLICE` again. A plain
//!   `BPF_PROG_ATTACH` replaces the map's program at once
//!   (`sock_map_prog_update` → `psock_set_prog`; `BPF_F_REPLACE` is refused
//!   for sockmaps), so every socket inserted from then on gets the new
//!   verdict. A socket keeps the verdict it was inserted with
//!   (`sock_map_link` copies the map's programs into the socket's psock):
//!   connections spliced before run on, unchanged, with the old one, which
//!   the kernel frees with the last of them;
//! - the `sock_ops` link gets the new `lb_setup` (`BPF_LINK_UPDATE`): the
//!   next callback runs it;
//! - both pins name the new programs.
//!
//! The XDP guard is not here: its attachment is a link owned by the
//! supervisor's process, attached anew by each owner
//! (`Objects::attach_guard`).

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{MapData, SockHash},
    programs::{SkSkb, SockOps, links::FdLink, links::PinnedLink},
};
use lb_common::maps::{LINK_SETUP, PINNED, PROG_SETUP, PROG_VERDICT, SPLICE};

use super::{KernelError, open};

/// Loads this binary's object on the maps pinned at `pin_path` (every one
/// must be there: a missing pin would be made anew, empty) and loads the
/// programs the earlier instance runs: the verdict if it is pinned, and
/// `lb_setup` if its link is. Nothing is attached and nothing changes for
/// the running instance; a program the verifier refuses on these maps is
/// an error.
pub(super) fn load_on_pins(pin_path: &Path) -> Result<aya::Ebpf, KernelError> {
    let pins: Vec<(&str, PathBuf)> = PINNED.iter().map(|n| (*n, pin_path.join(n))).collect();
    if let Some((name, _)) = pins.iter().find(|(_, p)| !p.exists()) {
        return Err(KernelError::Program(format!("map {name} is not pinned under {}", pin_path.display())));
    }
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
    if pin_path.join(PROG_VERDICT).exists() {
        let prog: &mut SkSkb = typed_program(&mut ebpf, PROG_VERDICT)?;
        prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_VERDICT} on the pinned maps: {e}")))?;
    }
    if pin_path.join(LINK_SETUP).exists() {
        let prog: &mut SockOps = typed_program(&mut ebpf, PROG_SETUP)?;
        prog.load().map_err(|e| KernelError::Program(format!("loading {PROG_SETUP} on the pinned maps: {e}")))?;
    }
    Ok(ebpf)
}

/// What [`install`] put in place.
#[derive(Debug, Default)]
pub struct Installed {
    /// The verdict attached to `LB_SPLICE`: its program id.
    pub verdict: Option<u32>,
    /// `lb_setup` in the pinned cgroup link: its program id.
    pub setup: Option<u32>,
}

/// Puts the programs [`load_on_pins`] loaded in place of the running ones
/// (see the module's comment), and pins them in place of theirs.
pub(super) fn install(ebpf: &mut aya::Ebpf, pin_path: &Path) -> Result<Installed, KernelError> {
    let mut done = Installed::default();
    let verdict: &mut SkSkb = typed_program(ebpf, PROG_VERDICT)?;
    if verdict.fd().is_ok() {
        let splice: SockHash<MapData, u64> = open(pin_path, SPLICE)?;
        verdict
            .attach(splice.fd())
            .map_err(|e| KernelError::Program(format!("attaching {PROG_VERDICT} to {SPLICE}: {e}")))?;
        let path = pin_path.join(PROG_VERDICT);
        let _ = fs::remove_file(&path);
        verdict.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        done.verdict = id_of(verdict.info());
    }
    let setup: &mut SockOps = typed_program(ebpf, PROG_SETUP)?;
    if let Ok(fd) = setup.fd() {
        let link = pin_path.join(LINK_SETUP);
        super::link::update_pinned(&link, fd.as_fd()).map_err(|source| KernelError::Io {
            what: format!("putting {PROG_SETUP} in the link pinned at {}", link.display()),
            source,
        })?;
        let path = pin_path.join(PROG_SETUP);
        let _ = fs::remove_file(&path);
        setup.pin(&path).map_err(|source| KernelError::Pin { path, source })?;
        done.setup = id_of(setup.info());
    }
    Ok(done)
}

fn id_of(info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) -> Option<u32> {
    info.ok().map(|i| i.id())
}

/// The programs that act on new connections of the instance pinned at
/// `pin_path`, by kernel id: the verdict attached to its `LB_SPLICE` (what
/// a socket spliced now gets) and the program in its `sock_ops` link.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Running {
    pub verdict_id: Option<u32>,
    pub setup_id: Option<u32>,
}

/// Reads [`Running`] for the maps pinned at `pin_path` (`splice`: its
/// `LB_SPLICE`). What cannot be read is `None`.
pub fn running(pin_path: &Path, splice: &SockHash<MapData, u64>) -> Running {
    let verdict_id = super::link::stream_verdict_of(splice.fd().as_fd()).ok().flatten();
    let setup_id = PinnedLink::from_pin(pin_path.join(LINK_SETUP))
        .ok()
        .and_then(|l| FdLink::from(l).info().ok())
        .map(|i| i.program_id());
    Running { verdict_id, setup_id }
}

/// The program `name` of the object, as its type `T`.
pub(super) fn typed_program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Program(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e| KernelError::Program(format!("program {name}: {e}")))
}
