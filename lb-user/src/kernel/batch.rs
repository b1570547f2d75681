//! Batched lookups, updates and deletes of a BPF hash map: one `bpf()` for
//! many elements (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6).
//! aya has no wrapper for them. The kernel runs the map's own update or
//! delete for each element in turn (`generic_map_update_batch`,
//! `generic_map_delete_batch` in `kernel/bpf/syscall.c`), stops at the first
//! that fails and reports in `count` how many it did.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

/// `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`
/// in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs batch command `cmd`; returns how many elements the kernel did, and
/// its error if it stopped before the last.
fn run(cmd: libc::c_long, attr: &mut BatchAttr) -> (usize, io::Result<()>) {
    // `keys` and `values` point to `count` elements of the map's key and
    // value sizes, borrowed by the caller; the kernel writes back `count`.
    let r = super::sys::bpf(cmd, attr).map(drop);
    (attr.count as usize, r)
}

fn attr<K>(map: &impl AsFd, keys: &[K]) -> io::Result<BatchAttr> {
    Ok(BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        map_fd: map.as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    })
}

/// Sets `keys[i]` to `values[i]` for every `i`, inserting or replacing
/// (`BPF_ANY`: the batch takes no other flag but `BPF_F_LOCK`). On an
/// error, the elements before the failing one are in the map.
pub fn update<K: Copy, V: Copy>(map: &impl AsFd, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut a = attr(map, keys)?;
    a.values = values.as_ptr() as u64;
    run(BPF_MAP_UPDATE_BATCH, &mut a).1
}

/// Deletes every one of `keys` that is in the map; keys that are not are
/// skipped (`ENOENT` stops the kernel's batch, which then resumes after the
/// missing key). Returns how many were deleted.
pub fn delete<K: Copy>(map: &impl AsFd, mut keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    while !keys.is_empty() {
        let mut a = attr(map, keys)?;
        match run(BPF_MAP_DELETE_BATCH, &mut a) {
            (done, Ok(())) => return Ok(deleted + done),
            (done, Err(e)) if e.raw_os_error() == Some(libc::ENOENT) && done < keys.len() => {
                deleted += done;
                keys = &keys[done + 1..];
            }
            (_, Err(e)) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Elements asked for per `BPF_MAP_LOOKUP_BATCH`.
const LOOKUP_CHUNK: usize = 4096;

/// Every element of a hash map, `LOOKUP_CHUNK` per `bpf()` (a walk with
/// `get_next_key` and a lookup takes two per element). An element added or
/// removed meanwhile may be missed or seen: as with any walk, a snapshot
/// of a map that changes is not one moment's.
pub fn lookup_all<K: bytemuck::Pod, V: bytemuck::Pod>(map: &impl AsFd) -> io::Result<Vec<(K, V)>> {
    let (keys, values) = lookup_raw::<K, V>(map, 1)?;
    Ok(keys.into_iter().zip(values).collect())
}

/// [`lookup_all`] for a per-CPU hash map: each element with its value on
/// each of `cpus` possible CPUs (`V` a multiple of 8 bytes, as the kernel
/// lays per-CPU values out).
pub fn lookup_all_per_cpu<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &impl AsFd,
    cpus: usize,
) -> io::Result<Vec<(K, Vec<V>)>> {
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU values are 8-aligned");
    let cpus = cpus.max(1);
    let (keys, values) = lookup_raw::<K, V>(map, cpus)?;
    Ok(keys.into_iter().zip(values.chunks_exact(cpus).map(<[V]>::to_vec)).collect())
}

/// The keys and values of every element, `stride` values per key.
fn lookup_raw<K: bytemuck::Pod, V: bytemuck::Pod>(map: &impl AsFd, stride: usize) -> io::Result<(Vec<K>, Vec<V>)> {
    let (mut all_keys, mut all_values) = (Vec::new(), Vec::new());
    let mut chunk = LOOKUP_CHUNK;
    // The position: a bucket index for hash maps (a u32; a u64 leaves room).
    let (mut at, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); chunk];
        let mut values = vec![V::zeroed(); chunk * stride];
        let mut a = attr(map, &keys)?;
        a.keys = keys.as_mut_ptr() as u64;
        a.values = values.as_mut_ptr() as u64;
        a.in_batch = if first { 0 } else { &raw const at as u64 };
        a.out_batch = &raw mut next as u64;
        let (n, r) = run(BPF_MAP_LOOKUP_BATCH, &mut a);
        all_keys.extend_from_slice(&keys[..n.min(chunk)]);
        all_values.extend_from_slice(&values[..n.min(chunk) * stride]);
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((all_keys, all_values)),
            // One bucket holds more than `chunk` elements: ask for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < 1 << 20 => {
                chunk *= 4;
                continue;
            }
            Err(e) => return Err(e),
        }
        at = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A fresh `BPF_MAP_TYPE_HASH` of u64 -> u64, or `None` without the
    /// privilege to make one (outside CI).
    fn hash_map() -> Option<OwnedFd> {
        #[repr(C)]
        struct Create {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        let attr = Create { map_type: 1, key_size: 8, value_size: 8, max_entries: 16 };
        // SAFETY: BPF_MAP_CREATE (0) reads `size_of::<Create>()` bytes of `attr`.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, 0 as libc::c_long, &attr as *const Create, size_of::<Create>()) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            assert!(std::env::var_os("CI").is_none(), "creating a BPF hash map under CI: {e}");
            eprintln!("skipped: cannot create a BPF map: {e}");
            return None;
        }
        // SAFETY: the kernel just returned this descriptor, owned by no one else.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    #[test]
    fn update_then_delete_skips_missing_keys() {
        let Some(map) = hash_map() else { return };
        super::update(&map, &[1u64, 3, 5], &[10u64, 30, 50]).unwrap();
        // 2 and 4 are missing: the kernel stops at each, and the rest still go.
        assert_eq!(super::delete(&map, &[1u64, 2, 3, 4, 5]).unwrap(), 3);
        assert_eq!(super::delete(&map, &[1u64, 3, 5]).unwrap(), 0, "deleted twice");
        // A key already there is replaced, not refused.
        super::update(&map, &[7u64], &[70u64]).unwrap();
        super::update(&map, &[6u64, 7], &[60u64, 71]).unwrap();
        assert_eq!(super::delete(&map, &[6u64, 7, 8]).unwrap(), 2);
        assert_eq!(super::delete::<u64>(&map, &[]).unwrap(), 0);
    }

    #[test]
    fn lookup_all_sees_every_element() {
        let Some(map) = hash_map() else { return };
        assert!(super::lookup_all::<u64, u64>(&map).unwrap().is_empty());
        let keys: Vec<u64> = (1..=16).collect();
        let values: Vec<u64> = keys.iter().map(|k| k * 10).collect();
        super::update(&map, &keys, &values).unwrap();
        let mut all = super::lookup_all::<u64, u64>(&map).unwrap();
        all.sort_unstable();
        assert_eq!(all, keys.iter().map(|k| (*k, k * 10)).collect::<Vec<_>>());
    }
}
