//! A holder's heartbeat: a counter in a small file (`<run file>.beat<N>`,
//! beside the holder's socket) that the close watcher advances as it goes
//! round its loop, which it does at least every [`WatchConf::beat`]
//! however idle. The supervisor's watchdog reads it: a holder whose
//! counter stands still (stopped, or its watcher deadlocked) while its CPU
//! time does too is hung. The file holds the holder's pid, so a count left
//! by a predecessor is never taken for this holder's.
//!
//! [`WatchConf::beat`]: super::WatchConf

use std::{
    fs::File,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

/// `pid count\n`, fixed width, so each write replaces the whole of it.
fn line(pid: u32, n: u64) -> String {
    format!("{pid:>10} {n:>20}\n")
}

pub struct Beat {
    file: File,
    pid: u32,
    /// Writes no more often than this (the watcher may go round far more often).
    every: Duration,
    /// The count, and when it was last written.
    last: Mutex<(u64, Instant)>,
}

impl Beat {
    /// Creates (or takes over) the file at `path`, mode 0600, and writes a
    /// first beat; later ones at most every `every`.
    pub fn create(path: &Path, every: Duration) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        let pid = std::process::id();
        file.write_all_at(line(pid, 0).as_bytes(), 0)?;
        Ok(Self { file, pid, every, last: Mutex::new((0, Instant::now())) })
    }

    /// One more beat, if the last is `every` old.
    pub fn tick(&self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.1.elapsed() < self.every {
            return;
        }
        *last = (last.0 + 1, Instant::now());
        if let Err(e) = self.file.write_all_at(line(self.pid, last.0).as_bytes(), 0) {
            log::debug!("writing the heartbeat: {e}");
        }
    }
}

/// The count at `path` if process `pid` wrote it; `None` if it did not
/// (yet: no file, or a predecessor's). `Err`: the file could not be read
/// (this process is out of descriptors, say), which says nothing of the
/// holder.
pub fn read(path: &Path, pid: u32) -> std::io::Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    Ok(match (f.next(), f.next()) {
        (Some(Ok(p)), Some(Ok(n))) if p == u64::from(pid) => Some(n),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Beat, read};

    #[test]
    fn beats_count_up_no_faster_than_asked_and_name_their_writer() {
        let path = std::env::temp_dir().join(format!("lb-beat-test-{}", std::process::id()));
        let b = Beat::create(&path, Duration::from_millis(20)).unwrap();
        let me = std::process::id();
        let read = |pid| read(&path, pid).unwrap();
        assert_eq!(read(me), Some(0));
        b.tick();
        assert_eq!(read(me), Some(0), "a beat sooner than asked");
        std::thread::sleep(Duration::from_millis(25));
        b.tick();
        assert_eq!(read(me), Some(1));
        assert_eq!(read(me + 1), None, "another process's beat");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read(me), None, "no file yet");
        assert!(super::read(&std::env::temp_dir(), me).is_err(), "a directory cannot be read as one");
    }
}
