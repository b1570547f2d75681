//! `cargo xtask setup`: make a fresh machine able to build and run lb.
//! Every step checks first, so a second run takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(name: &str) {
    eprintln!("setup: {name}");
}

pub fn setup() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    // haproxy and nginx (stream module) are the benchmark's comparison points;
    // nginx is also the tests' web server, ab (apache2-utils) their HTTP
    // load tool. iperf3, sockperf and wrk are the benchmark's instruments.
    // fonts-dejavu-core: the benchmark's plots draw their labels with it.
    debian_packages(&[
        "bpftool",
        "iproute2",
        "procps",
        "haproxy",
        "nginx",
        "libnginx-mod-stream",
        "apache2-utils",
        "iperf3",
        "sockperf",
        "wrk",
        "fonts-dejavu-core",
    ])?;
    bpffs()?;
    eprintln!("setup: ready");
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!("rustup is not installed; lb's eBPF build needs rustup with a nightly toolchain");
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to nightly");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// bpf-linker must link the same LLVM major as the nightly rustc. No LLVM
/// development package of that version exists here, but rustc ships its own
/// libLLVM; bpf-linker is built against it through a prefix of symlinks.
fn bpf_linker() -> anyhow::Result<()> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .trim()
        .to_owned();
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {} (nightly rustc without its LLVM?)", libdir.display()))?;

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("lb-llvm").join(&lib);
    let stamp = cargo_home.join("lb-llvm").join("bpf-linker.stamp");
    let want = format!("{lib}\n");
    let works = Command::new("bpf-linker").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if works && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    step(&format!("building bpf-linker against rustc's LLVM {llvm} ({lib}); takes about a minute"));
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib).with_context(|| format!("creating {}", plib.display()))?;
    for name in ["libLLVM.so".to_owned(), lib.clone()] {
        let link = plib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link).with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "--locked", "--force", "bpf-linker", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
    .with_context(|| {
        format!("installing bpf-linker with feature llvm-{major} failed: that LLVM major may be newer than bpf-linker supports")
    })?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn debian_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("packages {} are missing and there is no apt-get; install them by hand", missing.join(", "));
    }
    run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed (run as root, with the Debian mirrors reachable)")?;
    // Packages with services (haproxy, nginx) must not start them: the
    // benchmark runs its own instances. policy-rc.d exit 101 tells
    // invoke-rc.d so; it is ours only if it was not there before.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(policy, "#!/bin/sh\n# written by lb's cargo xtask setup during apt-get install\nexit 101\n")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let r = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {} failed", missing.join(" ")));
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")))
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs failed: lb's kernel data plane needs root (or CAP_SYS_ADMIN) for this once")
}
