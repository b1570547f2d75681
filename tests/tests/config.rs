//! Config fixtures and the CLI's answers to bad input.

use std::{path::Path, process::Command};

use lb::config::Config;
use testkit::lbproc::lb_bin;

fn fixtures(kind: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(kind);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

#[test]
fn valid_fixtures_load() {
    for f in fixtures("valid") {
        Config::load(&f).unwrap_or_else(|e| panic!("{} should be valid: {e}", f.display()));
    }
}

#[test]
fn invalid_fixtures_fail_with_their_message() {
    for f in fixtures("invalid") {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: <message>`", f.display()));
        let err = Config::load(&f).err().unwrap_or_else(|| panic!("{} should be rejected", f.display())).to_string();
        assert!(err.starts_with(&format!("{}:", f.display())), "{err}: must start with FILE:LINE");
        assert!(err.contains(expect), "{}: error `{err}` does not contain `{expect}`", f.display());
    }
}

#[test]
fn lb_check_exit_codes_and_output() {
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/valid/basic.toml");
    let out = Command::new(lb_bin()).arg("check").arg("--config").arg(&good).output().unwrap();
    assert!(out.status.success(), "lb check on a valid file: {}", String::from_utf8_lossy(&out.stderr));
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/invalid/unknown-backend.toml");
    let out = Command::new(lb_bin()).arg("check").arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown-backend.toml:5: frontend \"web\": backend: no [[backend]] named \"ap\""), "{err}");
}

#[test]
fn busy_listen_address_fails_before_start() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let (dir, pin_path) = testkit::lbproc::scratch();
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "dataplane = \"userspace\"\npin_path = \"{}\"\n[[frontend]]\nname = \"web\"\nlisten = \"{addr}\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
            pin_path.display()
        ),
    )
    .unwrap();
    let out = Command::new(lb_bin()).args(["run", "--config"]).arg(&cfg).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "lb run must fail when its listen address is busy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("frontend \"web\": listen {addr}")) && err.contains("in use"), "{err}");
    assert!(!pin_path.exists(), "a failed start left pins at {}", pin_path.display());
}

#[test]
fn bad_cli_arguments_are_named() {
    let out = Command::new(lb_bin()).args(["run", "--config", "/x.toml", "--dataplane", "fast"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dataplane") && err.contains("fast"), "{err}");
    let out = Command::new(lb_bin()).args(["check", "--config", "/nonexistent/lb.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lb.toml: cannot read"));
}
