//! Where an instance keeps its files besides the pins (bpffs holds only
//! pins): the lock, its metadata and the control socket. The test kit
//! uses the same names to clean up after an lb it killed.

use std::{
    format,
    path::{Path, PathBuf},
    string::String,
};

/// The default directory for those files (`runtime_dir`) when systemd
/// gives none.
pub const RUN_DIR: &str = "/run/lb";

/// The directory for those files when the config (or command line) names
/// none: systemd's `RUNTIME_DIRECTORY` (its first entry), else [`RUN_DIR`].
pub fn default_run_dir() -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(v) if !v.is_empty() => {
            let s = v.to_string_lossy();
            PathBuf::from(s.split(':').next().unwrap_or(RUN_DIR))
        }
        _ => PathBuf::from(RUN_DIR),
    }
}

/// `<run_dir>/<pin path with every non-alphanumeric as _>.<ext>`:
/// `lock`, `json` (metadata) or `sock` (control socket).
pub fn run_file(run_dir: &Path, pin_path: &Path, ext: &str) -> PathBuf {
    let name: String =
        pin_path.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    run_dir.join(format!("{name}.{ext}"))
}

/// Every file [`run_file`] names for one instance.
pub const EXTENSIONS: [&str; 3] = ["lock", "json", "sock"];

/// The socket of worker slot `index`'s holder (`<run file>.hold<index>`).
pub fn holder_socket(run_dir: &Path, pin_path: &Path, index: u16) -> PathBuf {
    run_file(run_dir, pin_path, &format!("hold{index}"))
}

/// The lock of worker slot `index`'s holder (`<run file>.hold<index>.lock`):
/// held by the live holder, with its pid, so that `lb run` and `lb stop` find
/// the holders of an instance whose supervisor is gone.
pub fn holder_lock(run_dir: &Path, pin_path: &Path, index: u16) -> PathBuf {
    run_file(run_dir, pin_path, &format!("hold{index}.lock"))
}

/// The heartbeat file of worker slot `index`'s holder (`<run file>.beat<index>`).
pub fn holder_beat(run_dir: &Path, pin_path: &Path, index: u16) -> PathBuf {
    run_file(run_dir, pin_path, &format!("beat{index}"))
}
