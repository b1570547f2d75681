//! The supervisor's child processes: starting a worker or a holder and
//! waiting for its ready line, talking to a worker over its pipes, and
//! signalling and stopping them.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    pin::Pin,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustix::process::Signal;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines},
    process::Child,
    task::{JoinError, JoinSet},
};

use super::{
    Ready,
    holder::{HolderReady, HolderSpec},
    worker::{CommandLine, ReplyLine, WorkerSpec},
};
use crate::servers::command::Command;

/// One worker place.
pub(super) struct Slot {
    pub(super) io: Option<WorkerIo>,
    pub(super) pid: Option<u32>,
    pub(super) started: std::time::Instant,
}

/// The pipes to a worker: commands down stdin, one reply line each up
/// stdout, both carrying the command's id.
pub(super) struct WorkerIo {
    stdin: Pin<Box<dyn AsyncWrite + Send>>,
    lines: Lines<BufReader<Pin<Box<dyn AsyncRead + Send>>>>,
    /// The id of the next command.
    next: u64,
}

/// How long a worker may take to answer a command.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping child may take before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a child may take to start serving.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);

impl WorkerIo {
    pub(super) fn new(stdin: impl AsyncWrite + Send + 'static, stdout: impl AsyncRead + Send + 'static) -> Self {
        let stdout: Pin<Box<dyn AsyncRead + Send>> = Box::pin(stdout);
        Self { stdin: Box::pin(stdin), lines: BufReader::new(stdout).lines(), next: 1 }
    }

    /// Sends `cmd` and waits up to [`COMMAND_TIMEOUT`] for its answer.
    pub(super) async fn send(&mut self, cmd: &Command) -> Result<String, String> {
        self.send_within(cmd, COMMAND_TIMEOUT).await
    }

    /// Sends `cmd` and waits up to `within` for the answer with its id; an
    /// answer to an earlier command that came after its time is skipped.
    pub(super) async fn send_within(&mut self, cmd: &Command, within: Duration) -> Result<String, String> {
        let id = self.next;
        self.next += 1;
        let mut line = serde_json::to_vec(&CommandLine { id, cmd: cmd.clone() }).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stdin.write_all(&line).await.map_err(|e| format!("sending: {e}"))?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let l = match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => l,
                Ok(Ok(None)) => return Err("exited".into()),
                Ok(Err(e)) => return Err(format!("reading: {e}")),
                Err(_) => return Err(format!("no answer within {within:?}")),
            };
            let r: ReplyLine = serde_json::from_str(&l).map_err(|e| format!("bad reply {l:?}: {e}"))?;
            match r.id {
                i if i == id => return if r.reply.ok { Ok(r.reply.message) } else { Err(r.reply.message) },
                i if i < id => log::debug!("a late answer to command {i}, after its timeout: {:?}", r.reply.message),
                i => return Err(format!("an answer to command {i}, not yet sent")),
            }
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
    let mut io = WorkerIo::new(stdin, stdout);
    match tokio::time::timeout(START_TIMEOUT, io.lines.next_line()).await {
        Ok(Ok(Some(line))) => {
            let ready: R =
                serde_json::from_str(line.trim()).with_context(|| format!("reading the {role}'s ready line"))?;
            Ok((child, ready, io))
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

/// The children of one kind (workers, holders), by slot: their exits as
/// they come in, and a pidfd of each, so a signal only ever reaches the
/// process started for the slot, never one that got its pid after it
/// exited and was reaped. Only the exit of a slot's current child is
/// reported: one replaced since (a holder that handed its slot over, and
/// whose exit comes after its successor's start) is no news.
#[derive(Default)]
pub(super) struct Waits {
    exits: JoinSet<(usize, u32, std::io::Result<ExitStatus>)>,
    /// Slot → the pid and pidfd of the last child started in it.
    pidfds: HashMap<usize, (u32, OwnedFd)>,
    /// Slot → the pid of the last child started in it.
    current: HashMap<usize, u32>,
}

type Exit = Result<(usize, std::io::Result<ExitStatus>), JoinError>;

impl Waits {
    /// Waits for `child`, started for slot `i`, from now on.
    pub(super) fn watch(&mut self, i: usize, mut child: Child) {
        // Not waited for yet, so not reaped: the pid is still the child's.
        let pidfd = child.id().and_then(|p| {
            let pid = rustix::process::Pid::from_raw(p as i32)?;
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(|e| log::warn!("pidfd of child {p}: {e}; it cannot be signalled"))
                .ok()
                .map(|fd| (p, fd))
        });
        match pidfd {
            Some(p) => self.pidfds.insert(i, p),
            None => self.pidfds.remove(&i),
        };
        let pid = child.id().unwrap_or(0);
        self.current.insert(i, pid);
        self.exits.spawn(async move { (i, pid, child.wait().await) });
    }

    /// The next exit of a slot's current child.
    pub(super) async fn join_next(&mut self) -> Option<Exit> {
        loop {
            let exit = self.exits.join_next().await?;
            if let Some(e) = self.news(exit) {
                return Some(e);
            }
        }
    }

    pub(super) fn try_join_next(&mut self) -> Option<Exit> {
        loop {
            let exit = self.exits.try_join_next()?;
            if let Some(e) = self.news(exit) {
                return Some(e);
            }
        }
    }

    /// `exit`, unless it is that of a child since replaced in its slot.
    fn news(&self, exit: Result<(usize, u32, std::io::Result<ExitStatus>), JoinError>) -> Option<Exit> {
        match exit {
            Ok((i, pid, status)) if self.current.get(&i) == Some(&pid) => Some(Ok((i, status))),
            Ok((i, pid, status)) => {
                log::debug!("an earlier child of slot {i} (pid {pid}) {}", describe(&status));
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Whether slot `i`'s child still runs: its pidfd says so even before
    /// the child is reaped (`kill(pid, 0)` succeeds on a zombie).
    pub(super) fn running(&self, i: usize) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        self.pidfds.get(&i).is_some_and(|(_, fd)| {
            let mut fds = [PollFd::new(fd, PollFlags::IN)];
            poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })).is_ok_and(|n| n == 0)
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.exits.is_empty()
    }

    /// Sends `sig` to slot `i`'s child if it still runs: whether it did.
    pub(super) fn signal(&self, i: usize, sig: Signal) -> bool {
        self.pidfds.get(&i).is_some_and(|(_, fd)| rustix::process::pidfd_send_signal(fd, sig).is_ok())
    }

    /// Sends `sig` to every child still running: the pids it reached.
    fn signal_all(&self, sig: Signal) -> Vec<u32> {
        self.pidfds.iter().filter(|(i, _)| self.signal(**i, sig)).map(|(_, (pid, _))| *pid).collect()
    }
}

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

/// SIGTERM to every child of `waits` still running, then SIGKILL to those
/// still running after [`STOP_GRACE`]; returns once all have exited.
pub(super) async fn stop_all(waits: &mut Waits) {
    waits.signal_all(Signal::TERM);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while !waits.is_empty() {
        match tokio::time::timeout_at(deadline, waits.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                for pid in waits.signal_all(Signal::KILL) {
                    log::warn!("pid {pid} did not stop within {STOP_GRACE:?}; killed it");
                }
                while waits.join_next().await.is_some() {}
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustix::process::Signal;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    use super::{Waits, WorkerIo, stop_all};
    use crate::{
        control::Reply,
        instance::worker::{CommandLine, ReplyLine},
        servers::command::Command,
    };

    /// A worker that answers a command after the supervisor stopped
    /// waiting: that late answer is not taken for the next command's.
    #[tokio::test]
    async fn a_late_answer_is_not_taken_for_the_next_commands() {
        let (sup_out, worker_in) = tokio::io::duplex(4096);
        let (worker_out, sup_in) = tokio::io::duplex(4096);
        let mut io = WorkerIo::new(sup_out, sup_in);
        let worker = tokio::spawn(async move {
            let (mut lines, mut out) = (BufReader::new(worker_in).lines(), worker_out);
            for answer in ["first", "second"] {
                let line = lines.next_line().await.unwrap().unwrap();
                let CommandLine { id, .. } = serde_json::from_str(&line).unwrap();
                if answer == "first" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let reply = ReplyLine { id, reply: Reply { ok: true, message: answer.into() } };
                out.write_all(format!("{}\n", serde_json::to_string(&reply).unwrap()).as_bytes()).await.unwrap();
            }
        });
        let addr = crate::addr::ServerAddr("127.0.0.1:1".parse().unwrap());
        let cmd = Command::ServerWeight { backend: "b".into(), addr, weight: 1 };
        let first = io.send_within(&cmd, Duration::from_millis(100)).await;
        assert!(first.is_err_and(|e| e.contains("no answer")));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(io.send_within(&cmd, Duration::from_secs(5)).await, Ok("second".into()));
        worker.await.unwrap();
    }

    /// A child that exited (and was reaped) is not signalled: its pid may
    /// belong to another process by now. One that runs is, and stops.
    #[tokio::test]
    async fn only_children_still_running_are_signalled() {
        let mut waits = Waits::default();
        waits.watch(0, tokio::process::Command::new("true").spawn().unwrap());
        waits.watch(1, tokio::process::Command::new("sleep").arg("30").spawn().unwrap());
        let (i, status) = waits.join_next().await.unwrap().unwrap();
        assert_eq!(i, 0);
        assert!(status.unwrap().success());
        assert!(!waits.signal(0, Signal::TERM), "the reaped child was signalled");
        assert!(!waits.signal(7, Signal::TERM), "a slot without a child");
        let t0 = std::time::Instant::now();
        stop_all(&mut waits).await;
        assert!(t0.elapsed() < Duration::from_secs(5), "the running child was not stopped by SIGTERM");
        assert!(waits.is_empty());
    }

    /// A child replaced in its slot (a holder that handed over, then
    /// exited): its exit is not reported, so it is not taken for the death
    /// of its successor; the successor's is. A child that exited counts as
    /// not running, reaped or not.
    #[tokio::test]
    async fn only_the_exit_of_a_slots_current_child_is_reported() {
        let mut waits = Waits::default();
        let first = tokio::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        waits.watch(0, first);
        assert!(waits.running(0));
        let second = tokio::process::Command::new("sleep").arg("30").spawn().unwrap();
        let second_pid = second.id().unwrap();
        waits.watch(0, second);
        let early = tokio::time::timeout(Duration::from_secs(2), waits.join_next()).await;
        assert!(early.is_err(), "the replaced child's exit was reported: {early:?}");
        assert!(waits.running(0));
        assert!(waits.signal(0, Signal::KILL));
        let (i, status) = waits.join_next().await.unwrap().unwrap();
        assert_eq!(i, 0);
        assert!(status.is_ok_and(|s| !s.success()), "pid {second_pid} was not the one killed");
        assert!(!waits.running(0));
        assert!(waits.is_empty());
    }
}
