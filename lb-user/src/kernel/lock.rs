//! Instance locks: a file under the run directory, `flock`ed exclusively
//! by the instance that owns a resource (its pins, its control socket) and
//! holding that instance's pid, so that a second instance can name the
//! first, and a reader can tell a live instance from stale files.

use std::{
    fs,
    io::{self, Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

use rustix::fs::{FlockOperation, flock};

/// A lock this process holds; released when dropped (or when it dies).
#[derive(Debug)]
pub struct Lock {
    _file: fs::File,
    pub path: PathBuf,
}

/// Takes the lock at `path` and writes this process's pid into it. `Ok(Err(pid))`:
/// another process holds it (with the pid it wrote, if readable).
pub fn take(path: &Path) -> io::Result<Result<Lock, Option<u32>>> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        return Ok(Err(read_pid(&mut file)));
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Ok(Lock { _file: file, path: path.to_owned() }))
}

/// Who the lock at `path` belongs to: `None` if there is no lock file, else
/// whether a live process holds it and the pid written in it.
pub fn holder(path: &Path) -> Option<(bool, Option<u32>)> {
    let mut file = fs::File::open(path).ok()?;
    let pid = read_pid(&mut file);
    let free = flock(&file, FlockOperation::NonBlockingLockShared).is_ok();
    if free {
        let _ = flock(&file, FlockOperation::Unlock);
    }
    Some((!free, pid))
}

fn read_pid(file: &mut fs::File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_sees_the_first_pid_and_a_dropped_lock_is_free() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let path = dir.join("x.lock");
        let first = take(&path).unwrap().unwrap();
        assert_eq!(holder(&path), Some((true, Some(std::process::id()))));
        // flock locks belong to the open file: a second open is refused.
        assert_eq!(take(&path).unwrap().unwrap_err(), Some(std::process::id()));
        drop(first);
        assert_eq!(holder(&path), Some((false, Some(std::process::id()))));
        assert_eq!(holder(&dir.join("none.lock")), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
