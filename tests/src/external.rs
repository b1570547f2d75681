//! Third-party programs run beside lb by the tests and the benchmark: nginx
//! (as a web server and as a stream proxy), HAProxy, and the standard load
//! tools. `cargo xtask setup` installs them from Debian's packages.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A started third-party server, stopped (SIGTERM, then SIGKILL) on drop;
/// its scratch directory is removed with it.
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (nginx's workers).
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let mut v = vec![pid];
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            v.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        v
    }

    /// What the program logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: signalling a process this kit started, by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn scratch(what: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lb-ext-{}-{what}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    d
}

/// A loopback address with a port free right now. Third-party servers take
/// a port number in their configuration; [`start`] retries if it was taken
/// in between.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding 127.0.0.1:0")
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Starts `program` with the arguments `args(addr, dir)` returns (after
/// writing any configuration file into the scratch `dir`) for a free
/// loopback `addr`, and waits until it listens there. Tries three ports
/// before giving up with the program's log.
pub fn server(
    program: &str,
    args: impl Fn(SocketAddr, &Path) -> Result<Vec<String>, String>,
) -> Result<Process, String> {
    let mut last = String::new();
    for _ in 0..3 {
        let dir = scratch(program);
        let addr = free_addr();
        let argv = args(addr, &dir)?;
        let log = dir.join("stderr.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let child = Command::new(program)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {program}: {e} (run `cargo xtask setup`)"))?;
        let p = Process { child, addr, dir, log };
        if wait_listening(addr, Duration::from_secs(10)) {
            return Ok(p);
        }
        last = p.log();
    }
    Err(format!("{program} did not listen: {last}"))
}

/// [`server`] for a program configured by a file: `config(addr, dir)` is
/// written to `dir/<file>`, and `args(path, dir)` start the program with it.
fn configured(
    program: &str,
    file: &str,
    config: impl Fn(SocketAddr, &Path) -> String,
    args: impl Fn(&Path, &Path) -> Vec<String>,
) -> Result<Process, String> {
    server(program, |addr, dir| {
        let path = dir.join(file);
        std::fs::write(&path, config(addr, dir)).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(args(&path, dir))
    })
}

/// nginx answering every HTTP request with status 200 and `body`.
pub fn nginx_http(body: &str) -> Result<Process, String> {
    let body = body.replace('\\', "\\\\").replace('"', "\\\"");
    configured(
        "nginx",
        "nginx.conf",
        |addr, dir| {
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
                 error_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n\
                 fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
                 server {{\n    listen {addr} backlog=4096;\n    location / {{ return 200 \"{body}\"; }}\n  }}\n}}\n",
                d = dir.display()
            )
        },
        nginx_args,
    )
}

fn nginx_args(path: &Path, dir: &Path) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    vec!["-p".into(), s(dir), "-e".into(), s(&dir.join("error.log")), "-c".into(), s(path)]
}

/// nginx as a TCP (stream) proxy to `backend`, two workers.
pub fn nginx_stream(backend: SocketAddr) -> Result<Process, String> {
    configured(
        "nginx",
        "nginx.conf",
        |addr, dir| {
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
                 error_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 19000; }}\n\
                 stream {{\n  server {{\n    listen {addr} reuseport backlog=4096;\n    proxy_pass {backend};\n\
                 proxy_timeout 1h;\n    proxy_half_close on;\n  }}\n}}\n",
                d = dir.display()
            )
        },
        nginx_args,
    )
}

/// HAProxy in TCP mode in front of `backend`, two threads, `maxconn`;
/// `splice` turns on `option splice-auto`.
pub fn haproxy(backend: SocketAddr, splice: bool, maxconn: usize) -> Result<Process, String> {
    let splice = if splice { "    option splice-auto\n" } else { "" };
    configured(
        "haproxy",
        "haproxy.cfg",
        |addr, _| {
            format!(
                "global\n    nbthread 2\n    maxconn {maxconn}\n    maxpipes 500\n\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n{splice}\n\
                 frontend f\n    bind {addr}\n    default_backend b\n\n\
                 backend b\n    server s1 {backend}\n"
            )
        },
        |path, _| vec!["-db".into(), "-f".into(), path.display().to_string()],
    )
}

/// What ApacheBench reported.
#[derive(Clone, Debug, Default)]
pub struct AbReport {
    pub complete: u64,
    pub failed: u64,
    /// The breakdown line of the failures, as ab prints it.
    pub failures: String,
    pub non_2xx: u64,
    pub requests_per_s: f64,
}

/// `ab -n N -c C` against `url`: HTTP/1.0, a new connection per request.
/// Socket errors are counted (`-r`) rather than ending the run.
pub fn ab(url: &str, n: u64, concurrency: u64) -> Result<AbReport, String> {
    let out = Command::new("ab")
        .args(["-q", "-r", "-s", "30", "-n", &n.to_string(), "-c", &concurrency.to_string(), url])
        .output()
        .map_err(|e| format!("running ab: {e} (run `cargo xtask setup`)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let num = |key: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(key)).and_then(|r| r.split_whitespace().next()?.parse().ok())
    };
    let complete = num("Complete requests:").ok_or_else(|| {
        format!("ab printed no result ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    Ok(AbReport {
        complete: complete as u64,
        failed: num("Failed requests:").unwrap_or(0.0) as u64,
        failures: text.lines().find(|l| l.trim_start().starts_with("(Connect:")).unwrap_or("").trim().to_owned(),
        non_2xx: num("Non-2xx responses:").unwrap_or(0.0) as u64,
        requests_per_s: num("Requests per second:").unwrap_or(0.0),
    })
}
