//! The XDP guard's figure: SYNs per second it drops on one core, against
//! SYNs per second that reach the listener without it (the same frames,
//! passed). The generator is the kernel: `lb-xdp-flood` runs the attached
//! program with `BPF_PROG_TEST_RUN` in live-frames mode on this core, and
//! the kernel acts on each verdict as a driver would (a dropped frame is
//! freed, a passed one goes up the stack to TCP), so no userspace tool
//! slower than the guard sets the rate. Both measurements alternate within
//! each round, in a network namespace of their own.
//!
//! Some hosts refuse live-frame test runs (`EPERM`; seen with the kernel
//! in lockdown, integrity mode) while lb and its guard work. There the
//! rate cannot be measured without a generator slower than the guard, so
//! the bench says so and why, and measures what it can: the guard still
//! drops every denied frame (ordinary test runs, its counter checked), and
//! the program's own time per frame as the kernel measures it.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use super::Opts;

const LISTEN: &str = "10.201.0.1:7000";
/// A source in the guard's `deny` list.
const DENIED: &str = "10.201.0.99";
/// A source the guard lets through.
const PASSED: &str = "10.201.0.50";

/// What the guard scenario measured.
pub enum Figures {
    /// Every counted value, in packets per second.
    Rates { dropped: Vec<f64>, reached: Vec<f64> },
    /// Live frames refused on this host (`why`): the program's own time
    /// per denied frame, in ns, from ordinary test runs.
    NoLiveFrames { why: String, ns_per_frame: Vec<f64> },
}

/// The namespace and the lb in it, removed on drop.
struct Setup {
    ns: String,
    lb: Option<Child>,
    dir: std::path::PathBuf,
    pins: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut lb) = self.lb.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(lb.id() as i32, libc::SIGTERM) };
            let _ = lb.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::run(Command::new("ip").args(args).stdout(Stdio::null()))
}

/// In the namespace, without remounting /sys (pins stay visible).
fn inside(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

/// TCP segments the namespace's stack has taken in.
fn in_segs(ns: &str) -> anyhow::Result<u64> {
    let out = inside(ns, Path::new("/bin/cat")).arg("/proc/net/snmp").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp: header")?, tcp.next().context("no Tcp: values")?);
    let i = names.split_whitespace().position(|n| n == "InSegs").context("no InSegs")?;
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).context("bad InSegs")
}

fn flood(ns: &str, tool: &Path, pins: &Path, src: &str, packets: u32, plain: bool) -> anyhow::Result<f64> {
    let mut cmd = inside(ns, tool);
    cmd.arg("--prog").arg(pins.join("lb_guard")).args([
        "--interface",
        "a0",
        "--src",
        src,
        "--dst",
        LISTEN,
        "--packets",
        &packets.to_string(),
    ]);
    if plain {
        cmd.arg("--plain");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("lb-xdp-flood: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if plain {
        // XDP_DROP is 1.
        if v["verdict"].as_u64() != Some(1) {
            bail!("the guard returned {} for a denied frame, not XDP_DROP", v["verdict"]);
        }
        return v["ns_per_frame"].as_f64().context("lb-xdp-flood printed no ns_per_frame");
    }
    v["pps"].as_f64().context("lb-xdp-flood printed no pps")
}

/// Why this host refuses live-frame test runs, if it does: `None` when a
/// short live run works.
fn live_frames_refused(ns: &str, tool: &Path, pins: &Path) -> anyhow::Result<Option<String>> {
    match flood(ns, tool, pins, PASSED, 1, false) {
        Ok(_) => Ok(None),
        Err(e) if format!("{e:#}").contains("Operation not permitted") => {
            let lockdown = lockdown().map_or(String::new(), |l| format!("; kernel lockdown: {l}"));
            Ok(Some(format!("BPF_PROG_TEST_RUN with live frames refused (EPERM){lockdown}")))
        }
        Err(e) => Err(e),
    }
}

/// The kernel's lockdown mode (`integrity`, ...), if securityfs tells.
fn lockdown() -> Option<String> {
    let path = "/sys/kernel/security/lockdown";
    let text = std::fs::read_to_string(path).ok().or_else(|| {
        // Not mounted: mount it for the read, then leave it as it was.
        let ok = Command::new("mount")
            .args(["-t", "securityfs", "securityfs", "/sys/kernel/security"])
            .status()
            .is_ok_and(|s| s.success());
        let t = std::fs::read_to_string(path).ok();
        if ok {
            let _ = Command::new("umount").arg("/sys/kernel/security").status();
        }
        t
    })?;
    let mode = text.split_whitespace().find(|w| w.starts_with('['))?;
    Some(mode.trim_matches(['[', ']']).to_owned())
}

fn denied_count(lb: &Path, pins: &Path) -> anyhow::Result<u64> {
    let out = Command::new(lb).args(["stats", "--json", "--pin-path"]).arg(pins).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("lb stats --json")?;
    v["guard"]["denied"].as_u64().context("no guard.denied in lb stats")
}

pub fn guard(lb: &Path, tool: &Path, o: &Opts) -> anyhow::Result<Figures> {
    let tag = format!("lbbench-guard-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let mut s = Setup { ns: tag.clone(), lb: None, dir: dir.clone(), pins: Path::new("/sys/fs/bpf").join(&tag) };
    ip(&["netns", "add", &s.ns])?;
    ip(&["-n", &s.ns, "link", "add", "a0", "type", "veth", "peer", "name", "b0"])?;
    ip(&["-n", &s.ns, "addr", "add", "10.201.0.1/24", "dev", "a0"])?;
    for dev in ["lo", "a0", "b0"] {
        ip(&["-n", &s.ns, "link", "set", dev, "up"])?;
    }
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "dataplane = \"kernel\"\npin_path = \"{}\"\nruntime_dir = \"{}\"\naccess_log = false\n\
             [guard]\ninterfaces = [\"a0\"]\ndeny = [\"{DENIED}\"]\n\
             [[frontend]]\nname = \"f\"\nlisten = \"{LISTEN}\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
            s.pins.display(),
            dir.display()
        ),
    )?;
    let mut child = inside(&s.ns, lb)
        .args(["run", "--announce", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr"))?)
        .spawn()?;
    let stdout = child.stdout.take().context("lb stdout")?;
    s.lb = Some(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.contains("\"ready\"") {
        bail!("lb with the guard did not start: {}", std::fs::read_to_string(dir.join("stderr")).unwrap_or_default());
    }
    let packets: u32 = if o.smoke { 200_000 } else { 5_000_000 };
    let rounds = o.runs + usize::from(!o.smoke);
    let refused = live_frames_refused(&s.ns, tool, &s.pins)?;
    if let Some(why) = &refused {
        eprintln!("guard: {why}: the drop rate cannot be measured on this host; timing the program alone");
    }
    let (mut dropped, mut reached, mut ns_per_frame) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let before = denied_count(lb, &s.pins)?;
        let d = flood(&s.ns, tool, &s.pins, DENIED, packets, refused.is_some())?;
        let denied = denied_count(lb, &s.pins)? - before;
        if denied != u64::from(packets) {
            bail!("the guard counted {denied} of {packets} denied frames");
        }
        let counted = o.smoke || round > 0;
        if refused.is_some() {
            if counted {
                ns_per_frame.push(d);
            }
            continue;
        }
        let segs = in_segs(&s.ns)?;
        let r = flood(&s.ns, tool, &s.pins, PASSED, packets, false)?;
        let took = in_segs(&s.ns)? - segs;
        if took < u64::from(packets) {
            bail!("only {took} of {packets} passed SYNs reached TCP");
        }
        if counted {
            dropped.push(d);
            reached.push(r);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(match refused {
        Some(why) => Figures::NoLiveFrames { why, ns_per_frame },
        None => Figures::Rates { dropped, reached },
    })
}
