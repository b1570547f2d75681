//! `lb upgrade` (and SIGUSR2): the running instance hands itself to a new
//! binary without dropping a connection or refusing a client.
//!
//! The old supervisor starts `NEW takeover` and gives it, on stdin, the
//! configuration it runs with and the commands applied since. The new one
//! checks everything it can before touching anything (configuration, the
//! pinned maps' layout, the protocol between holders) and says `standby`,
//! or fails and the old instance goes on untouched. Then slot by slot: the
//! old worker stops (it sees the clients it accepted through to its holder;
//! clients that arrive meanwhile wait in the listen backlog, which the
//! holder keeps), the new holder takes the old holder's listening sockets
//! and connections (`dataplane::holder::take_over`) and the old holder
//! exits, and a new worker starts on them. Last, the old supervisor lets go
//! of its control socket, metrics endpoint and pin-path lock, and the new
//! one takes them and says `ready`; the old one answers the operator and
//! exits, leaving the pins and the attached verdict to the new one.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{ChildStdin, ChildStdout},
};

use super::{
    children::{Slot, Started, spawn_holder, spawn_worker},
    owner::Owner,
    state::{Procs, Supervisor},
};
use crate::{config::Overrides, dataplane::holder::wire::VERSION, servers::command::Command};

/// What the old supervisor tells the new one (first line of its stdin).
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeSpec {
    /// [`VERSION`] of the holder protocol.
    pub version: u32,
    pub config_file: PathBuf,
    pub config_text: String,
    pub overrides: Overrides,
    pub listen: Vec<std::net::SocketAddr>,
    /// Operator commands applied so far, then the servers' health.
    pub replay: Vec<Command>,
}

/// One line between the two supervisors after the spec.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// New → old: checked, ready to take slots.
    Standby { pid: u32 },
    /// New → old: cannot go on (before any slot: nothing changed).
    Failed { why: String },
    /// Old → new: slot `index`'s worker has stopped; take its holder.
    Release { index: usize },
    /// New → old: slot `index` serves again, with `took` connections.
    Slot { index: usize, took: usize },
    /// Old → new: the control socket, metrics and lock are free.
    Services,
    /// New → old: the new instance serves everything.
    Ready { pid: u32 },
}

/// How long the new binary may take to say `standby`, and each slot.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

async fn next_step(lines: &mut Lines<BufReader<ChildStdout>>) -> Result<Step, String> {
    match tokio::time::timeout(STEP_TIMEOUT, lines.next_line()).await {
        Err(_) => Err(format!("no answer within {STEP_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("reading its answer: {e}")),
        Ok(Ok(None)) => Err("it exited (see its messages above)".into()),
        Ok(Ok(Some(l))) => match serde_json::from_str(&l) {
            Ok(Step::Failed { why }) => Err(why),
            Ok(s) => Ok(s),
            Err(_) => Err(format!("it said {l:?}")),
        },
    }
}

/// Tells the new binary `msg` (one line) and reads its answer.
async fn ask(
    stdin: &mut ChildStdin,
    lines: &mut Lines<BufReader<ChildStdout>>,
    msg: &impl Serialize,
) -> Result<Step, String> {
    let mut line = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stdin.write_all(&line).await.map_err(|e| format!("telling the new binary: {e}"))?;
    next_step(lines).await
}

/// Why an answer was not the one expected.
fn unexpected(answer: Result<Step, String>) -> String {
    match answer {
        Ok(step) => format!("it said {step:?}"),
        Err(why) => why,
    }
}

/// The path this process runs from, as it is on disk now (the file may
/// have been replaced since the start).
fn own_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let s = exe.to_string_lossy();
    Ok(PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s)))
}

/// The old side: hands the instance to `binary` (default: this
/// executable's path). `Ok`: the new instance serves everything and this
/// process's children are gone; the caller ends. `Err`: why not; this
/// instance goes on (if a slot could not be handed over, it was restarted
/// here, and the message says which connections were lost).
pub(super) async fn hand_over(
    sup: &mut Supervisor,
    procs: &mut Procs,
    owner: &mut Owner,
    binary: Option<PathBuf>,
) -> Result<String, String> {
    if sup.cfg.guard.is_some() {
        return Err("the XDP guard ([guard]) is not carried over by an upgrade yet: stop and start instead".into());
    }
    let binary = match binary {
        Some(b) => b,
        None => own_binary()?,
    };
    if !binary.is_file() {
        return Err(format!("{} is not a file", binary.display()));
    }
    let t0 = Instant::now();
    log::info!("upgrade: starting {}", binary.display());
    let mut child = tokio::process::Command::new(&binary)
        .arg("takeover")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("starting {}: {e}; this instance goes on", binary.display()))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("no pipes to the new binary".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    let spec = UpgradeSpec {
        version: VERSION,
        config_file: sup.reload.path.clone(),
        config_text: sup.spec.config_text.clone(),
        overrides: sup.reload.overrides,
        listen: sup.spec.listen.clone(),
        replay: sup.replay_now(),
    };
    let new_pid = match ask(&mut stdin, &mut lines, &spec).await {
        Ok(Step::Standby { pid }) => pid,
        other => {
            let why = unexpected(other);
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(format!("{} cannot take over: {why}; this instance goes on untouched", binary.display()));
        }
    };
    let mut took = 0;
    for i in 0..sup.slots.len() {
        stop_worker(sup, procs, i).await;
        match ask(&mut stdin, &mut lines, &Step::Release { index: i }).await {
            Ok(Step::Slot { index, took: n }) if index == i => {
                took += n;
                sup.holders[i].1 = None; // it exits now, by itself
            }
            other => {
                let why = unexpected(other);
                let _ = child.start_kill();
                let _ = child.wait().await;
                let lost = recover(sup, procs, i).await;
                return Err(format!("the new binary failed at slot {i}: {why}; {lost}"));
            }
        }
    }
    owner.hand_over();
    match ask(&mut stdin, &mut lines, &Step::Services).await {
        Ok(Step::Ready { .. }) => {}
        // Every slot is the new instance's already; it serves without
        // whatever it could not take, and says so in its log.
        other => log::error!("upgrade: the new instance (pid {new_pid}) did not confirm its services: {other:?}"),
    }
    // The old holders exit once their connections are handed over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::timeout_at(deadline, procs.holders.join_next()).await.is_ok_and(|r| r.is_some()) {}
    Ok(format!(
        "upgraded to {} in {:.2}s: new supervisor pid {new_pid}, {took} spliced connection(s) handed over",
        binary.display(),
        t0.elapsed().as_secs_f64()
    ))
}

/// Stops slot `i`'s worker (SIGTERM; it finishes the clients it accepted)
/// and waits for it, without restarting it.
async fn stop_worker(sup: &mut Supervisor, procs: &mut Procs, i: usize) {
    let Some(pid) = sup.slots[i].pid.take() else { return };
    sup.slots[i].io = None;
    procs.workers.signal(i, rustix::process::Signal::TERM);
    let deadline = tokio::time::Instant::now() + super::children::STOP_GRACE;
    loop {
        match tokio::time::timeout_at(deadline, procs.workers.join_next()).await {
            Ok(Some(Ok((j, _)))) if j == i => return,
            Ok(Some(Ok((j, _)))) => {
                // Another worker died meanwhile: the new instance replaces it too.
                sup.slots[j].pid = None;
                sup.slots[j].io = None;
            }
            Ok(_) => return,
            Err(_) => {
                log::warn!("worker {i} (pid {pid}) did not stop; killing it");
                procs.workers.signal(i, rustix::process::Signal::KILL);
            }
        }
    }
}

/// The new binary failed after taking slots `..=failed`: this instance
/// serves them again. A slot whose old holder had already handed over is
/// taken back from the new binary's holder, which outlives its supervisor
/// (or, if that holder is gone too, lost its connections with it).
async fn recover(sup: &mut Supervisor, procs: &mut Procs, failed: usize) -> String {
    // The old holders that handed over have exited: forget their exits, so
    // the loop does not take them for the holders started here.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Some(r) = procs.holders.try_join_next() {
        // A holder of a slot not handed over that died meanwhile: restart it
        // here (its worker exits with it and the loop restarts that).
        if let Ok((i, _)) = r
            && i > failed
            && sup.holders[i].1.take().is_some()
        {
            log::error!("holder {i} died during the upgrade; its connections are lost; restarting it");
            match spawn_holder(&sup.holders[i].0).await {
                Ok((child, pid, _)) => {
                    sup.holders[i].1 = Some(pid);
                    procs.watch_holder(i, child);
                }
                Err(e) => log::error!("restarting holder {i}: {e:#}"),
            }
        }
    }
    let mut lost = Vec::new();
    for i in 0..=failed {
        // Its pidfd tells an old holder that handed over from one that
        // resumed, even before it is reaped.
        let alive = sup.holders[i].1.is_some() && procs.holders.running(i);
        if !alive {
            let spec = &sup.holders[i].0;
            let started = match super::adopt::holder_alive(spec) {
                Some(new) => super::adopt::take_holder(spec, new).await,
                None => spawn_holder(spec).await.map(|h| (h, false)),
            };
            if !started.as_ref().is_ok_and(|(_, kept)| *kept) {
                lost.push(i);
            }
            match started.map(|(h, _)| h) {
                Ok((child, pid, _)) => {
                    sup.holders[i].1 = Some(pid);
                    procs.watch_holder(i, child);
                }
                Err(e) => log::error!("restarting holder {i}: {e:#}"),
            }
        }
        match spawn_worker(sup.spec_for(i)).await {
            Ok(Started { child, ready, io }) => {
                sup.slots[i] = Slot { io: Some(io), pid: Some(ready.pid), started: Instant::now() };
                procs.watch_worker(i, child);
            }
            Err(e) => log::error!("restarting worker {i}: {e:#}"),
        }
    }
    if lost.is_empty() {
        "this instance serves every slot again; no connection was lost".into()
    } else {
        format!("this instance serves every slot again; the connections of slot(s) {lost:?} were lost")
    }
}

/// One line to the old instance.
pub(super) fn say(step: &Step) {
    if let Err(e) = super::write_line(&serde_json::to_string(step).unwrap_or_default()) {
        log::error!("telling the old instance {step:?}: {e}");
    }
}
