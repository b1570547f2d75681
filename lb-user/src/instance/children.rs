//! The supervisor's child processes: starting a worker or a holder and
//! waiting for its ready line, talking to a worker over its pipes, and
//! stopping them.

use std::{
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
    task::JoinSet,
};

use super::{
    Ready,
    holder::{HolderReady, HolderSpec},
    worker::WorkerSpec,
};
use crate::{control::Reply, servers::command::Command};

/// The pipes to a worker: commands down stdin, one reply line each up stdout.
pub(super) struct WorkerIo {
    pub(super) stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// How long a worker may take to answer a command.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping child may take before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a child may take to start serving.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);

impl WorkerIo {
    pub(super) async fn send(&mut self, cmd: &Command) -> Result<String, String> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stdin.write_all(&line).await.map_err(|e| format!("sending: {e}"))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => {
                let r: Reply = serde_json::from_str(&l).map_err(|e| format!("bad reply {l:?}: {e}"))?;
                if r.ok { Ok(r.message) } else { Err(r.message) }
            }
            Ok(Ok(None)) => Err("exited".into()),
            Ok(Err(e)) => Err(format!("reading: {e}")),
            Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
        }
    }
}

/// A worker started and ready to serve.
pub(super) struct Started {
    pub(super) child: Child,
    pub(super) ready: Ready,
    pub(super) io: WorkerIo,
}

/// Starts `lb <role>` with `spec` on its stdin and waits for its ready
/// line (one JSON value of type `R`).
pub(super) async fn spawn_child<R: for<'de> serde::Deserialize<'de>>(
    role: &str,
    index: u16,
    spec: &impl serde::Serialize,
) -> anyhow::Result<(Child, R, WorkerIo)> {
    let exe = std::env::current_exe().context("finding the lb executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(role).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.env("LB_LOG_TAG", format!("{role}-{index}"));
    // Own process group: a terminal's Ctrl-C reaches only the supervisor,
    // which then stops its children in order.
    cmd.process_group(0);
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn().with_context(|| format!("starting a {role} process"))?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let mut line = serde_json::to_vec(spec)?;
    line.push(b'\n');
    stdin.write_all(&line).await.with_context(|| format!("sending the {role} its spec"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) => {
            let ready: R =
                serde_json::from_str(line.trim()).with_context(|| format!("reading the {role}'s ready line"))?;
            Ok((child, ready, WorkerIo { stdin, lines }))
        }
        _ => {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            bail!("{role} {index} did not start (exit: {status:?}); see its messages above")
        }
    }
}

/// Starts a worker and waits for its ready line.
pub(super) async fn spawn_worker(spec: WorkerSpec) -> anyhow::Result<Started> {
    let (child, ready, io) = spawn_child("worker", spec.index, &spec).await?;
    Ok(Started { child, ready, io })
}

/// Starts a holder and waits until it serves: its pid, and how many
/// connections it took over (`spec.takeover`).
pub(super) async fn spawn_holder(spec: &HolderSpec) -> anyhow::Result<(Child, u32, usize)> {
    let (child, ready, _io) = spawn_child::<HolderReady>("holder", spec.index, spec).await?;
    Ok((child, ready.pid, ready.took))
}

pub(super) type Waits = JoinSet<(usize, std::io::Result<ExitStatus>)>;

/// How a child ended, for the log: "exited with status 1", "was killed by
/// signal 9", or why it could not be waited for.
pub(super) fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let s = match status {
        Ok(s) => s,
        Err(e) => return format!("could not be waited for: {e}"),
    };
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(sig)) => format!("was killed by signal {sig}{}", if s.core_dumped() { " (core dumped)" } else { "" }),
        _ => "ended".into(),
    }
}

pub(super) fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// SIGTERM to `pids`, then SIGKILL to those still there after [`STOP_GRACE`].
pub(super) async fn stop_all(pids: &[u32], waits: &mut Waits) {
    for &pid in pids {
        signal(pid, rustix::process::Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !waits.is_empty() {
        match tokio::time::timeout_at(deadline, waits.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                for &pid in pids {
                    log::warn!("pid {pid} did not stop within {STOP_GRACE:?}; killing it");
                    signal(pid, rustix::process::Signal::KILL);
                }
                while waits.join_next().await.is_some() {}
                break;
            }
        }
    }
}
