//! Attaching the `sock_ops` program to lb's own cgroup through a pinned bpf
//! link (`BPF_LINK_CREATE` + `BPF_OBJ_PIN`): it stays attached while the pin
//! exists, so it outlives the process that made it (`lb upgrade` and a
//! start after a crash hand it on with the maps, and put their own program
//! in it with `BPF_LINK_UPDATE`) and goes with the pins. aya 0.14 attaches
//! `sock_ops` through a link but does not let it be pinned or updated.
//! Also `BPF_PROG_QUERY` on a sockmap: which verdict new sockets get.

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
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_CGROUP_SOCK_OPS` in `enum bpf_attach_type`.
const BPF_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_SK_SKB_STREAM_VERDICT` in `enum bpf_attach_type`.
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;

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

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
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
    let path = c_path(pin)?;
    let mut obj = ObjPin { pathname: path.as_ptr() as u64, bpf_fd: link.as_raw_fd() as u32, ..ObjPin::default() };
    bpf(BPF_OBJ_PIN, &mut obj)?;
    Ok(())
}

/// Puts `prog` in the link pinned at `pin` (`BPF_LINK_UPDATE`): the
/// attachment stays, its program changes at once (for `sock_ops`, from the
/// next callback on).
pub fn update_pinned(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let path = c_path(pin)?;
    let mut get = ObjPin { pathname: path.as_ptr() as u64, ..ObjPin::default() };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut update =
        LinkUpdate { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, ..LinkUpdate::default() };
    bpf(BPF_LINK_UPDATE, &mut update)?;
    Ok(())
}

/// The id of the stream verdict attached to the sockmap `map` (the one
/// sockets inserted from now on get), if any (`BPF_PROG_QUERY`).
pub fn stream_verdict_of(map: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let mut id = 0u32;
    let mut query = ProgQuery {
        target_fd: map.as_raw_fd() as u32,
        attach_type: BPF_SK_SKB_STREAM_VERDICT,
        prog_ids: (&mut id as *mut u32) as u64,
        prog_cnt: 1,
        ..ProgQuery::default()
    };
    bpf(BPF_PROG_QUERY, &mut query)?;
    Ok((query.prog_cnt > 0 && id != 0).then_some(id))
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
