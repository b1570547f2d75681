//! Where an instance keeps its files besides the pins (bpffs holds only
//! pins): the lock, its metadata and the control socket. The test kit
//! uses the same names to clean up after an lb it killed.

use std::{
    format,
    path::{Path, PathBuf},
    string::String,
};

/// The default directory for those files (`runtime_dir`).
pub const RUN_DIR: &str = "/run/lb";

/// `<run_dir>/<pin path with every non-alphanumeric as _>.<ext>`:
/// `lock`, `json` (metadata) or `sock` (control socket).
pub fn run_file(run_dir: &Path, pin_path: &Path, ext: &str) -> PathBuf {
    let name: String =
        pin_path.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    run_dir.join(format!("{name}.{ext}"))
}

/// Every file [`run_file`] names for one instance.
pub const EXTENSIONS: [&str; 3] = ["lock", "json", "sock"];
