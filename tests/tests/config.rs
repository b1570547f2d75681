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
    // Numbers out of range are refused by name, never a panic (1e20 s overflowed a Duration).
    for watch in ["1e20", "0", "NaN", "inf", "-5", "abc"] {
        let out = Command::new(lb_bin()).args(["stats", &format!("--watch={watch}")]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--watch {watch}: {err}");
        assert!(err.contains("--watch") && !err.contains("panicked"), "--watch {watch}: {err}");
    }
    for args in [
        &["run", "--config", "/x.toml", "--workers", "0"][..],
        &["run", "--config", "/x.toml", "--workers", "99999999999"],
    ] {
        let out = Command::new(lb_bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--workers") && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Values at and beyond the edges of every key in the configuration
/// reference: each file parses or is refused with FILE:LINE, never a panic.
#[test]
fn no_configuration_value_makes_lb_panic() {
    use proptest::prelude::*;
    // Edge values, and mostly plausible ones (`lo..hi`) so that validation
    // gets past the first key often enough.
    let number = |lo: u64, hi: u64| {
        prop_oneof![
            1 => Just("0".to_owned()),
            1 => Just("-1".to_owned()),
            1 => Just("4294967295".to_owned()),
            1 => Just("4294967296".to_owned()),
            1 => Just("18446744073709551615".to_owned()),
            1 => Just("1e30".to_owned()),
            1 => Just("\"7\"".to_owned()),
            80 => (lo..hi).prop_map(|n| n.to_string()),
        ]
    };
    let duration = prop_oneof![
        1 => Just("\"0s\"".to_owned()),
        1 => Just("\"1ns\"".to_owned()),
        1 => Just("\"365days\"".to_owned()),
        1 => Just("\"366days\"".to_owned()),
        1 => Just("\"300000000000y\"".to_owned()),
        1 => Just("\"18446744073709551615s\"".to_owned()),
        1 => Just("\"\"".to_owned()),
        1 => Just("\"soon\"".to_owned()),
        1 => Just("5".to_owned()),
        60 => (1u64..10_000).prop_map(|n| format!("\"{n}ms\"")),
    ];
    let addr = prop_oneof![
        40 => Just("\"127.0.0.1:0\"".to_owned()),
        1 => Just("\"127.0.0.1:65535\"".to_owned()),
        1 => Just("\"127.0.0.1:65536\"".to_owned()),
        1 => Just("\"[::1]:9\"".to_owned()),
        1 => Just("\"0.0.0.0:0\"".to_owned()),
        1 => Just("\"300.1.1.1:9\"".to_owned()),
        1 => Just("\"\"".to_owned()),
        1 => Just("\"host:9\"".to_owned()),
    ];
    let pool = prop_oneof![
        40 => Just("[\"127.0.1.1\"]".to_owned()),
        1 => Just("[\"127.0.2.0/30\", \"::1\"]".to_owned()),
        1 => Just("[\"127.0.0.0/33\"]".to_owned()),
        1 => Just("[\"::/0\"]".to_owned()),
        1 => Just("[\"10.0.0.0/8\"]".to_owned()),
        1 => Just("[]".to_owned()),
        1 => Just("[\"x\"]".to_owned()),
    ];
    let range = prop_oneof![
        40 => Just("\"1-65535\"".to_owned()),
        1 => Just("\"0-0\"".to_owned()),
        1 => Just("\"65535-1\"".to_owned()),
        1 => Just("\"1-70000\"".to_owned()),
        1 => Just("\"-\"".to_owned()),
    ];
    let keys = (
        (number(1, 5), number(100, 5_000), number(1, 5), number(1, 100), number(0, 5_000)),
        (duration.clone(), duration.clone(), duration.clone(), duration.clone(), duration),
        (addr.clone(), addr.clone().prop_map(|a| a.replace(":0\"", ":9001\"")), addr),
        (pool, range),
        (number(0, 257), number(1, 1_000), number(1, 5), number(1, 5)),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&keys, |((workers, maxconn, attempts, fmax, queue), (connect, qt, idle, interval, htimeout), (listen, server, metrics), (pool, range), (weight, smax, rise, fall))| {
            let text = format!(
                "workers = {workers}\nmaxconn = {maxconn}\nconnect_attempts = {attempts}\nmetrics_listen = {metrics}\n\
                 source_pool = {pool}\nsource_port_range = {range}\n\
                 [timeouts]\nconnect = {connect}\nqueue = {qt}\nidle = {idle}\n\
                 [[frontend]]\nname = \"f\"\nlisten = {listen}\nbackend = \"b\"\nmaxconn = {fmax}\n\
                 [[backend]]\nname = \"b\"\nqueue = {queue}\nservers = [{server}, {{ addr = \"127.0.0.1:9\", weight = {weight}, maxconn = {smax} }}]\n\
                 [backend.health]\ninterval = {interval}\ntimeout = {htimeout}\nrise = {rise}\nfall = {fall}\n"
            );
            match std::panic::catch_unwind(|| Config::parse("edge.toml", &text)) {
                Ok(Ok(_)) => accepted.set(accepted.get() + 1),
                Ok(Err(e)) => {
                    if std::env::var_os("LB_SHOW_EDGES").is_some() {
                        eprintln!("{e}");
                    }
                    prop_assert!(e.to_string().starts_with("edge.toml:"), "{e}")
                }
                Err(_) => prop_assert!(false, "Config::parse panicked on:\n{text}"),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // The mix must reach the end of validation often enough to mean something.
    assert!(accepted.get() >= 20, "only {} of 2000 generated files were valid", accepted.get());
}

/// `lb check` refuses a busy listen or metrics address, with its line, as
/// `lb run` would; but not the ports of the running instance the file
/// describes (checking a file before a reload is the common case).
#[test]
fn lb_check_probes_ports_unless_the_instance_runs() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let (dir, pin_path) = testkit::lbproc::scratch();
    let write = |name: &str, pins: &Path, top: &str, listen: &str| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!(
                "pin_path = \"{}\"\n{top}\n[[frontend]]\nname = \"web\"\nlisten = \"{listen}\"\nbackend = \"b\"\n\
                 [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
                pins.display()
            ),
        )
        .unwrap();
        p
    };
    let check = |p: &Path| {
        let out = Command::new(lb_bin()).arg("check").arg("--config").arg(p).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = write("busy.toml", &pin_path, "", &addr.to_string());
    let (code, _, err) = check(&f);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("busy.toml:5: frontend \"web\": listen {addr}: Address already in use")), "{err}");
    let f = write("metrics.toml", &pin_path, &format!("metrics_listen = \"{addr}\""), "127.0.0.1:0");
    let (code, _, err) = check(&f);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("metrics.toml:2: metrics_listen {addr}: Address already in use")), "{err}");
    drop(busy);

    // The file of a running instance: its own port is busy, and that is fine.
    let free = testkit::external::free_addr();
    let body = format!(
        "dataplane = \"userspace\"\npin_path = \"{}\"\n[[frontend]]\nname = \"web\"\nlisten = \"{free}\"\nbackend = \"b\"\n\
         [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
        pin_path.display()
    );
    let lb = testkit::Lb::launch("check_running", dir.clone(), pin_path.clone(), &body);
    let (code, out, err) = check(&lb.config_path());
    assert_eq!(code, Some(0), "lb check on the running instance's own file: {err}");
    assert!(out.contains(&format!("note: lb (pid {}) runs with pin_path", lb.pid)), "{out}");
    // Another instance's file with that port is refused.
    let other = write("other.toml", &pin_path.with_extension("other"), "", &free.to_string());
    let (code, _, err) = check(&other);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("frontend \"web\": listen {free}: Address already in use")), "{err}");
}
