//! Attaching the `sock_ops` program to lb's own cgroup through a pinned bpf
//! link (`BPF_LINK_CREATE` + `BPF_OBJ_PIN`): it stays attached while the pin
//! exists, so it outlives the process that made it (`lb upgrade` hands it
//! on with the maps) and goes with the pins (a start after a crash removes
//! stale pins, which detaches it). aya 0.14 attaches `sock_ops` through a
//! link but does not let it be pinned.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use super::sys::bpf;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_SOCK_OPS` in `enum bpf_attach_type`.
const BPF_CGROUP_SOCK_OPS: u32 = 3;

/// The leading members of `link_create` in `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// The `obj_pin` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Attaches the `sock_ops` program `prog` to the cgroup directory `cgroup`
/// and pins the link at `pin`.
pub fn attach_pinned(prog: BorrowedFd<'_>, cgroup: &Path, pin: &Path) -> io::Result<()> {
    let dir = File::open(cgroup)?;
    let mut create = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: dir.as_fd().as_raw_fd() as u32,
        attach_type: BPF_CGROUP_SOCK_OPS,
        ..LinkCreate::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut create)?;
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut obj = ObjPin { pathname: path.as_ptr() as u64, bpf_fd: link.as_raw_fd() as u32, ..ObjPin::default() };
    bpf(BPF_OBJ_PIN, &mut obj)?;
    Ok(())
}

/// The cgroup v2 directory of this process (`/proc/self/cgroup`'s `0::`
/// line under the cgroup2 mount of `/proc/self/mountinfo`).
pub fn own_cgroup() -> io::Result<PathBuf> {
    let not_found = |what: &str| io::Error::new(io::ErrorKind::NotFound, what.to_owned());
    let groups = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = groups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| not_found("no cgroup v2 entry in /proc/self/cgroup"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ").then(|| fields.split(' ').nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| not_found("no cgroup2 file system mounted"))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}
