//! The supervisor's watchdog over hung workers and holders.

use std::time::{Duration, Instant};

use super::{
    children::{Slot, Waits},
    holder::HolderSpec,
};
use crate::{dataplane::holder::beat, kernel::maps::StatMaps};

/// How many times `timeouts.worker` a worker that still gets CPU time may
/// go without a heartbeat before it is taken for hung after all (spinning).
/// On a saturated machine a busy worker's publication can come late; a
/// worker killed then takes its clients' handshakes with it, right when
/// the machine can least afford them coming back.
const BUSY_GRACE: u32 = 5;

/// How often a holder beats: four times within `timeouts.worker`.
pub(super) fn beat_every(hung_after: Duration) -> Duration {
    (hung_after / 4).max(Duration::from_millis(100))
}

/// Watches each worker's `LB_WORKERS` entry for progress: a worker whose
/// publication (every 100 ms) has not advanced for `timeouts.worker` and
/// that has had no CPU time since (stopped, deadlocked) is hung, and is
/// killed and restarted, since `SO_REUSEPORT` keeps handing it new clients.
/// One that still runs gets [`BUSY_GRACE`] times as long.
///
/// Each holder is judged the same way by its heartbeat file
/// ([`beat`]): a hung holder forwards no close and no idle timeout, and
/// its slot's workers cannot start. Killing it loses its connections (the
/// kernel's splice would carry their bytes without it), so it must be
/// hung by the same rule, and the log says what it cost.
pub(super) struct Watchdog {
    /// Where workers beat (an instance with pinned maps).
    maps: Option<StatMaps>,
    hung_after: Duration,
    /// Per slot.
    workers: Vec<Seen>,
    /// Per slot: the holder last seen, and what was seen of it.
    holders: Vec<Option<(u32, Seen)>>,
}

/// What the watchdog last saw of a process.
#[derive(Clone, Copy, Debug)]
struct Seen {
    seq: u64,
    /// When `seq` last changed (or the process was first seen).
    at: Instant,
    /// The CPU time (clock ticks) when its silence first passed
    /// `timeouts.worker`.
    cpu: Option<u64>,
    /// The busy warning was logged for this silence.
    said: bool,
}

impl Seen {
    fn new(seq: u64) -> Self {
        Self { seq, at: Instant::now(), cpu: None, said: false }
    }
}

/// What a silent process is.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    Fine,
    /// Silent past the limit: look at its CPU time again at the next check.
    Look,
    /// Silent, but it ran since: wait.
    Busy,
    Hung,
}

/// `silent`: since the last heartbeat; `cpu_then`: CPU time when the
/// silence passed `hung_after`, if looked at; `cpu_now`: now (`None`:
/// unreadable); `runnable`: a thread of it waits for a CPU now. A process
/// that ran since, or waits for a CPU (on a saturated machine one may get
/// none for seconds), is busy; one that sleeps and got no CPU is hung.
/// One whose CPU time cannot be read is not judged: it is gone (its exit
/// is handled where it is reaped), or the supervisor is out of
/// descriptors, and killing a holder for that would lose its connections.
fn judge(
    silent: Duration,
    hung_after: Duration,
    cpu_then: Option<u64>,
    cpu_now: Option<u64>,
    runnable: bool,
) -> Judgement {
    match (cpu_then, cpu_now) {
        _ if silent <= hung_after => Judgement::Fine,
        (_, None) | (None, Some(_)) => Judgement::Look,
        (Some(then), Some(now)) if (now > then || runnable) && silent <= hung_after * BUSY_GRACE => Judgement::Busy,
        _ => Judgement::Hung,
    }
}

/// Takes the heartbeat `seq` read now (`None`: none read) of the process
/// `pid`, which has run for `age`, and judges it; `what` names it in the
/// busy warning.
fn observe(seen: &mut Seen, seq: Option<u64>, pid: u32, age: Duration, hung_after: Duration, what: &str) -> Judgement {
    if let Some(s) = seq.filter(|s| *s != seen.seq) {
        *seen = Seen::new(s);
        return Judgement::Fine;
    }
    let silent = seen.at.elapsed().min(age);
    let now = if silent > hung_after { lb_common::host::cpu_ticks(pid) } else { None };
    let runnable = seen.cpu.is_some() && silent > hung_after && lb_common::host::runnable(pid);
    let j = judge(silent, hung_after, seen.cpu, now, runnable);
    match j {
        Judgement::Look => seen.cpu = now,
        Judgement::Busy if !std::mem::replace(&mut seen.said, true) => log::warn!(
            "{what} (pid {pid}): no heartbeat for {silent:.1?} but it is running: busy, not hung; it gets up to {:?}",
            hung_after * BUSY_GRACE
        ),
        _ => {}
    }
    j
}

impl Watchdog {
    pub(super) fn new(maps: Option<StatMaps>, hung_after: Duration, slots: usize) -> Self {
        Self { maps, hung_after, workers: vec![Seen::new(0); slots], holders: vec![None; slots] }
    }

    /// Kills the workers that stopped publishing and running; their exit
    /// restarts them.
    pub(super) fn check(&mut self, slots: &[Slot], workers: &Waits) {
        let Some(maps) = &self.maps else { return };
        for (i, slot) in slots.iter().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let seq = maps.workers.get(&(i as u32), 0).ok().filter(|w| w.pid == u64::from(pid)).map(|w| w.seq);
            let (age, what) = (slot.started.elapsed(), format!("worker {i}"));
            if observe(&mut self.workers[i], seq, pid, age, self.hung_after, &what) == Judgement::Hung {
                log::warn!(
                    "worker {i} (pid {pid}): no heartbeat for {:?} (timeouts.worker): hung; killing it",
                    self.hung_after
                );
                workers.signal(i, rustix::process::Signal::KILL);
                self.workers[i] = Seen::new(0);
            }
        }
    }

    /// Kills the holders whose heartbeat and CPU time stand still; their
    /// exit restarts them (and their slots' workers).
    pub(super) fn check_holders(&mut self, holders: &[(HolderSpec, Option<u32>)], waits: &Waits) {
        for (i, (spec, pid)) in holders.iter().enumerate() {
            let (Some(pid), Some((path, _))) = (*pid, &spec.beat) else { continue };
            // The file cannot be read (this supervisor is out of
            // descriptors): that says nothing of the holder; judged later.
            let Ok(seq) = beat::read(path, pid) else { continue };
            let entry = &mut self.holders[i];
            if entry.is_none_or(|(p, _)| p != pid) {
                // A holder new to the watchdog (started since): judged once it beats.
                *entry = seq.map(|s| (pid, Seen::new(s)));
                continue;
            }
            let Some((_, seen)) = entry else { continue };
            // Judged from its first beat on: its silence is all that counts.
            if observe(seen, seq, pid, Duration::MAX, self.hung_after, &format!("holder {i}")) == Judgement::Hung {
                log::error!(
                    "holder {i} (pid {pid}): no heartbeat for {:?} (timeouts.worker) and no CPU time since: hung \
                     (stopped or deadlocked), forwarding no close; killing it: the connections it holds are lost",
                    self.hung_after
                );
                waits.signal(i, rustix::process::Signal::KILL);
                *entry = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BUSY_GRACE, Judgement::*, judge};

    #[test]
    fn a_silent_worker_is_hung_only_if_it_stopped_running() {
        let limit = Duration::from_secs(2);
        let s = Duration::from_secs;
        assert_eq!(judge(s(1), limit, None, None, false), Fine);
        // Past the limit: its CPU time is taken, and looked at again next time.
        assert_eq!(judge(s(3), limit, None, Some(500), false), Look);
        assert_eq!(judge(s(3), limit, Some(500), Some(500), false), Hung, "stopped or deadlocked");
        assert_eq!(judge(s(3), limit, Some(500), Some(501), false), Busy);
        assert_eq!(judge(s(3), limit, Some(500), Some(500), true), Busy, "waiting for a CPU");
        assert_eq!(judge(limit * BUSY_GRACE + s(1), limit, Some(500), Some(9000), false), Hung, "spinning");
        assert_eq!(judge(limit * BUSY_GRACE + s(1), limit, Some(500), Some(500), true), Hung, "starved for too long");
        assert_eq!(judge(s(3), limit, None, None, false), Look, "gone, or /proc unreadable: not judged");
        assert_eq!(judge(s(3), limit, Some(500), None, false), Look, "unreadable after a first look");
        assert_eq!(judge(limit * BUSY_GRACE + s(1), limit, Some(500), None, false), Look);
    }
}
