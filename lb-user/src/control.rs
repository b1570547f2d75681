//! The runtime API: a Unix socket (mode 0600, root's) that takes one JSON
//! request per line and answers one JSON line. `lb server …` and `lb reload`
//! are its clients. Requests reach the process that owns the server set
//! (the single process, or the supervisor, which relays them to workers).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::kernel::lock::Lock;
use crate::servers::{
    command::{Command, CommandError},
    reload::ReloadError,
};

/// What a client asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    Apply(Command),
    Other {
        cmd: Other,
    },
    /// The XDP guard's lists.
    Guard {
        cmd: GuardCmd,
    },
    /// `lb upgrade`: replace the running binary, keeping every connection.
    Upgrade {
        upgrade: UpgradeReq,
    },
}

/// `lb upgrade [--binary PATH]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpgradeReq {
    /// The new executable; `None`: the running one's path, read again.
    pub binary: Option<PathBuf>,
}

/// `lb guard …`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GuardCmd {
    /// The lists and counters.
    Show,
    Add {
        list: crate::kernel::guard::List,
        cidr: String,
    },
    Remove {
        list: crate::kernel::guard::List,
        cidr: String,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Other {
    /// Re-read the configuration file and apply its server changes.
    Reload,
}

/// The answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
}

impl<E: std::fmt::Display> From<Result<String, E>> for Reply {
    fn from(r: Result<String, E>) -> Self {
        match r {
            Ok(message) => Reply { ok: true, message },
            Err(e) => Reply { ok: false, message: e.to_string() },
        }
    }
}

/// Why a request was refused (the reply's message says it).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// Applied by the supervisor, refused or unanswered by some workers.
    #[error("{applied}, but {}", .failures.join("; "))]
    Workers { applied: String, failures: Vec<String> },
    #[error("guard: {0}")]
    Guard(String),
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("permission denied: the control socket takes requests from root only")]
    PermissionDenied,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad request: server_health comes from lb's own health checks; use `lb server disable|enable` instead")]
    InternalOnly,
    #[error("lb is stopping")]
    Stopping,
    #[error("request too large: a request is one line of at most {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("no complete request line within {READ_TIMEOUT:?}")]
    Timeout,
}

/// Longest request line accepted (the largest real request, a server list
/// change, is a few hundred bytes).
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a session may take to send a complete request line.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Sessions served at once; further clients wait in the listen backlog.
const MAX_SESSIONS: usize = 16;

/// What a request gets: what changed, or why nothing did.
pub type Response = Result<String, RequestError>;

/// A request on its way to the owner, with where the answer goes.
pub struct Msg {
    pub req: Request,
    pub reply: oneshot::Sender<Response>,
}

/// `<runtime_dir>/<pin path, mangled>.sock`, unless the config names one.
pub fn default_path(run_dir: &Path, pin_path: &Path) -> PathBuf {
    lb_common::files::run_file(run_dir, pin_path, "sock")
}

/// The lock that makes a control socket one instance's.
pub fn lock_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", path.display()))
}

/// Takes the socket's lock (a second instance with the same
/// `control_socket` is refused, naming the first), binds the socket
/// (replacing a stale one) with mode 0600, and serves it until the task is
/// aborted. The lock is held as long as the returned [`Lock`].
pub fn listen(path: &Path, tx: mpsc::Sender<Msg>) -> anyhow::Result<(tokio::task::JoinHandle<()>, Lock)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let lock_at = lock_path(path);
    let lock = match crate::kernel::lock::take(&lock_at).with_context(|| format!("opening {}", lock_at.display()))? {
        Ok(l) => l,
        Err(pid) => anyhow::bail!(
            "control socket {} belongs to another running lb{} (lock {} is held); stop it or set another control_socket",
            path.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            lock_at.display()
        ),
    };
    // Held by no live instance: a socket left here is stale.
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    log::info!("control socket {}", path.display());
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    Ok((
        tokio::spawn(async move {
            // Accept errors (running out of descriptors) are logged at most
            // every 5 s and retried after a pause, never the end of the API.
            let mut backoff = crate::observe::Backoff::new("control socket");
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                match l.accept().await {
                    Ok((s, _)) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            session(s, tx).await;
                            drop(permit);
                        });
                    }
                    Err(e) => backoff.failed(&e).await,
                }
            }
        }),
        lock,
    ))
}

async fn session(s: UnixStream, tx: mpsc::Sender<Msg>) {
    let (r, mut w) = s.into_split();
    let allowed = match r.as_ref().peer_cred() {
        Ok(c) => c.uid() == 0 || c.uid() == rustix::process::geteuid().as_raw(),
        Err(_) => false,
    };
    let mut reader = BufReader::new(r);
    loop {
        let line = match read_request(&mut reader).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        let response: Response = if !allowed {
            Err(RequestError::PermissionDenied)
        } else {
            match line
                .and_then(|l| serde_json::from_str::<Request>(&l).map_err(|e| RequestError::BadRequest(e.to_string())))
            {
                Err(e) => Err(e),
                Ok(Request::Apply(Command::ServerHealth { .. })) => Err(RequestError::InternalOnly),
                Ok(req) => {
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Msg { req, reply }).await.is_err() {
                        Err(RequestError::Stopping)
                    } else {
                        rx.await.unwrap_or(Err(RequestError::Stopping))
                    }
                }
            }
        };
        // After a framing error the rest of the stream means nothing.
        let last = !allowed || matches!(response, Err(RequestError::TooLarge | RequestError::Timeout));
        let reply = Reply::from(response);
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() || last {
            return;
        }
    }
}

/// One request line, within [`MAX_REQUEST`] bytes and [`READ_TIMEOUT`];
/// `None` at a clean end of the stream.
async fn read_request(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Option<String>, RequestError> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut limited = (&mut *r).take(MAX_REQUEST as u64 + 1);
    let read = limited.read_until(b'\n', &mut buf);
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => Err(RequestError::Timeout),
        Ok(Err(e)) => Err(RequestError::BadRequest(e.to_string())),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) if buf.last() != Some(&b'\n') && buf.len() > MAX_REQUEST => Err(RequestError::TooLarge),
        // A last line without a newline is a request too.
        Ok(Ok(_)) => String::from_utf8(buf)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|_| RequestError::BadRequest("not UTF-8".into())),
    }
}

/// Client side: sends one request and returns the reply.
pub async fn request(path: &Path, req: &Request) -> anyhow::Result<Reply> {
    let s = UnixStream::connect(path).await.with_context(|| {
        format!("connecting to the control socket {} (is lb running, and are you root?)", path.display())
    })?;
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines.next_line().await?.context("lb closed the control socket without answering")?;
    Ok(serde_json::from_str(&reply)?)
}
