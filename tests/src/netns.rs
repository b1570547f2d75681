//! Network namespaces created by a test, entered by the test's own thread.
//!
//! Sockets a thread creates live in that thread's namespace, and processes it
//! spawns start there too. A test enters a namespace first thing (before it
//! builds its tokio runtime, which must be current-thread) and everything it
//! does afterwards stays inside: sysctls such as the ephemeral port range
//! apply to it alone, and it cannot touch the host's network.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A namespace named `lbt-<pid>-<n>`, deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// Creates the namespace with `lo` up and enters it on this thread.
    pub fn enter(test: &str) -> NetNs {
        let name = format!("lbt-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{test}: creating a network namespace: {e}"));
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{test}: {e}"));
        let f = File::open(format!("/run/netns/{}", ns.name)).unwrap_or_else(|e| panic!("{test}: {e}"));
        // SAFETY: valid namespace fd; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("{test}: setns: {}", std::io::Error::last_os_error());
        }
        ns
    }

    /// Sets a sysctl of this namespace (`net.ipv4.ip_local_port_range`, "40000 40099").
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // /proc/sys/net reflects the namespace of the opening thread: ours.
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("setting {key} = {value}: {e}"));
        let back = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(back.split_whitespace().collect::<Vec<_>>(), value.split_whitespace().collect::<Vec<_>>());
    }

    /// Established TCP connections from `src` to `dst` as `ss` sees them.
    pub fn ss_count(&self, src: &str, dst: &str) -> usize {
        self.ss_ports(src, dst).len()
    }

    /// The local ports of the established connections from `src` to `dst`.
    pub fn ss_ports(&self, src: &str, dst: &str) -> Vec<u16> {
        let out = Command::new("ss")
            .args(["-Htn", "state", "established", "src", src, "dst", dst])
            .output()
            .expect("running ss");
        // With a state filter the columns are: Recv-Q Send-Q Local Peer.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.rsplit_once(':')?.1.parse().ok())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
