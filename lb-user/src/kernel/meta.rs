//! What the owner of the pinned maps records about its instance next to
//! them, in its runtime directory: bpffs holds only pins.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// What the owner of the maps records next to them (bpffs holds only pins).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub pid: u32,
    pub dataplane: String,
    /// Backend names by index (`LB_SERVERS` keys carry the index).
    pub backends: Vec<String>,
    /// [`lb_common::maps::layout`] of the binary that made the maps.
    #[serde(default)]
    pub layout: String,
    /// SHA-256 of the eBPF object whose programs act on new connections
    /// ([`crate::EBPF_SHA256`] of the binary that loaded or replaced them).
    #[serde(default)]
    pub ebpf: String,
    /// Where each frontend listens (concrete addresses, config order): what
    /// the holders bound, for `lb run` taking them over after a crash.
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
    /// How to count the entries of the maps whose `memlock` grows with them.
    #[serde(default)]
    pub fill: Vec<super::fill::Gauge>,
}

impl Meta {
    pub(super) fn write(&self, run_dir: &Path, pin_path: &Path) {
        let path = run_file(run_dir, pin_path, "json");
        if let Err(e) = fs::write(&path, serde_json::to_vec(self).unwrap_or_default()) {
            log::warn!("writing {}: {e} (`lb stats` will show backend numbers, not names)", path.display());
        }
    }
}

impl Meta {
    /// The metadata of the instance pinned at `pin_path`, if it wrote any.
    pub fn read(run_dir: &Path, pin_path: &Path) -> Option<Meta> {
        let b = fs::read(run_file(run_dir, pin_path, "json")).ok()?;
        serde_json::from_slice(&b).ok()
    }
}

/// `<run_dir>/<pin path, mangled>.<ext>`: the files an instance keeps next
/// to its pins (`lock`, `json` for [`Meta`], `sock` for the control socket).
pub fn run_file(run_dir: &Path, pin_path: &Path, ext: &str) -> PathBuf {
    lb_common::files::run_file(run_dir, pin_path, ext)
}
