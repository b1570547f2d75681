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

/// Runs `ip` with `args`; `Err` names the command and what it said.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Moves the calling thread into the namespace at `path`.
fn set_thread_ns(path: &str) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`NetNs::within`] by the namespace's name (a `'static` future can carry it).
pub fn within<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let back = File::open("/proc/thread-self/ns/net").expect("opening this thread's network namespace");
    set_thread_ns(&format!("/run/netns/{name}")).unwrap_or_else(|e| panic!("entering namespace {name}: {e}"));
    let r = f();
    // SAFETY: valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(back.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("returning from namespace {name}: {}", std::io::Error::last_os_error());
    }
    r
}

impl NetNs {
    /// Creates the namespace with `lo` up, without entering it.
    pub fn create(test: &str) -> NetNs {
        let name = format!("lbt-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{test}: creating a network namespace: {e}"));
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{test}: {e}"));
        ns
    }

    /// Creates the namespace with `lo` up and enters it on this thread.
    pub fn enter(test: &str) -> NetNs {
        let ns = Self::create(test);
        set_thread_ns(&format!("/run/netns/{}", ns.name)).unwrap_or_else(|e| panic!("{test}: setns: {e}"));
        ns
    }

    /// Runs `f` with the calling thread inside this namespace, then moves
    /// the thread back: sockets `f` makes live here, whichever thread
    /// uses them later.
    pub fn within<T>(&self, f: impl FnOnce() -> T) -> T {
        within(&self.name, f)
    }

    /// Runs `f` on a thread of its own inside this namespace: sockets it
    /// makes live here (and stay here, whichever thread uses them later).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            set_thread_ns(&path).unwrap_or_else(|e| panic!("entering {path}: {e}"));
            f()
        })
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

/// Three namespaces in a row, client — lb — server, over two veth pairs
/// (MTU 1500): the calling thread enters lb's. The client reaches lb at
/// [`Triangle::FRONT`]; lb reaches the server from [`Triangle::SOURCE`].
pub struct Triangle {
    pub client: NetNs,
    pub server: NetNs,
    /// Last: deleted after the others.
    pub lb: NetNs,
}

impl Triangle {
    pub const CLIENT: &str = "10.201.1.2";
    /// lb's address toward the client.
    pub const FRONT: &str = "10.201.1.1";
    /// lb's address toward the server.
    pub const SOURCE: &str = "10.201.2.1";
    pub const SERVER: &str = "10.201.2.2";
    /// The same four in IPv6 (`/64`s, no duplicate address detection).
    pub const CLIENT6: &str = "fd00:201:1::2";
    pub const FRONT6: &str = "fd00:201:1::1";
    pub const SOURCE6: &str = "fd00:201:2::1";
    pub const SERVER6: &str = "fd00:201:2::2";
    /// lb's interfaces toward the client and toward the server.
    pub const TO_CLIENT: &str = "vc0";
    pub const TO_SERVER: &str = "vs0";

    pub fn enter(test: &str) -> Triangle {
        let lb = NetNs::enter(test);
        let (client, server) = (NetNs::create(test), NetNs::create(test));
        let must = |args: &[&str]| ip(args).unwrap_or_else(|e| panic!("{test}: {e}"));
        for (ns, here, there, [lb4, peer4, lb6, peer6]) in [
            (&client, Self::TO_CLIENT, "eth0", [Self::FRONT, Self::CLIENT, Self::FRONT6, Self::CLIENT6]),
            (&server, Self::TO_SERVER, "eth0", [Self::SOURCE, Self::SERVER, Self::SOURCE6, Self::SERVER6]),
        ] {
            must(&["link", "add", here, "type", "veth", "peer", "name", there, "netns", &ns.name]);
            must(&["addr", "add", &format!("{lb4}/24"), "dev", here]);
            must(&["addr", "add", &format!("{lb6}/64"), "dev", here, "nodad"]);
            must(&["link", "set", here, "up"]);
            must(&["-n", &ns.name, "addr", "add", &format!("{peer4}/24"), "dev", there]);
            must(&["-n", &ns.name, "addr", "add", &format!("{peer6}/64"), "dev", there, "nodad"]);
            must(&["-n", &ns.name, "link", "set", there, "up"]);
        }
        Triangle { client, server, lb }
    }

    /// Drops `per_mille` of the packets the client and the server send
    /// toward lb, at random (this kernel has no netem): a classic BPF
    /// filter, in direct-action mode, on each one's egress, that compares
    /// the kernel's random number (`SKF_AD_RANDOM`) with the share.
    pub fn lossy(&self, per_mille: u32) {
        let threshold = (u64::from(per_mille) << 32) / 1000;
        // ld rand; jgt #(1 - share): drop; ret TC_ACT_OK; drop: ret TC_ACT_SHOT.
        let keep_above = (1u64 << 32) - 1 - threshold;
        let code = format!("4,32 0 0 4294963256,37 1 0 {keep_above},6 0 0 0,6 0 0 2");
        for ns in [&self.client, &self.server] {
            for args in [
                vec!["-n", &ns.name, "qdisc", "add", "dev", "eth0", "clsact"],
                vec!["-n", &ns.name, "filter", "add", "dev", "eth0", "egress", "bpf", "da", "bytecode", &code],
            ] {
                let out = Command::new("tc").args(&args).output().expect("running tc");
                assert!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    /// Sets the MTU of the client's link, both ends.
    pub fn client_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        for args in [
            vec!["link", "set", Self::TO_CLIENT, "mtu", &mtu],
            vec!["-n", &self.client.name, "link", "set", "eth0", "mtu", &mtu],
        ] {
            ip(&args).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
