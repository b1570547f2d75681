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

use crate::servers::{
    command::{Command, CommandError},
    reload::ReloadError,
};

/// What a client asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    Apply(Command),
    Other { cmd: Other },
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
    #[error("permission denied: the control socket takes requests from root only")]
    PermissionDenied,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad request: server_health comes from lb's own health checks; use `lb server disable|enable` instead")]
    InternalOnly,
    #[error("lb is stopping")]
    Stopping,
}

/// What a request gets: what changed, or why nothing did.
pub type Response = Result<String, RequestError>;

/// A request on its way to the owner, with where the answer goes.
pub struct Msg {
    pub req: Request,
    pub reply: oneshot::Sender<Response>,
}

/// `/run/lb/<pin path, mangled>.sock`, unless the config names one.
pub fn default_path(pin_path: &Path) -> PathBuf {
    lb_common::files::run_file(Path::new(lb_common::files::RUN_DIR), pin_path, "sock")
}

/// Binds the socket (replacing a stale one: the caller holds the pin-path
/// lock) with mode 0600, and serves it until the task is aborted.
pub fn listen(path: &Path, tx: mpsc::Sender<Msg>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    log::info!("control socket {}", path.display());
    Ok(tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(session(s, tx.clone()));
        }
    }))
}

async fn session(s: UnixStream, tx: mpsc::Sender<Msg>) {
    let (r, mut w) = s.into_split();
    let allowed = match r.as_ref().peer_cred() {
        Ok(c) => c.uid() == 0 || c.uid() == rustix::process::geteuid().as_raw(),
        Err(_) => false,
    };
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response: Response = if !allowed {
            Err(RequestError::PermissionDenied)
        } else {
            match serde_json::from_str::<Request>(&line) {
                Err(e) => Err(RequestError::BadRequest(e.to_string())),
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
        let reply = Reply::from(response);
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() || !allowed {
            return;
        }
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
