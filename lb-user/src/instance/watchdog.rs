//! The supervisor's watchdog over hung workers.

use std::time::{Duration, Instant};

use super::{children::Waits, supervisor::Slot};

/// How many times `timeouts.worker` a worker that still gets CPU time may
/// go without a heartbeat before it is taken for hung after all (spinning).
/// On a saturated machine a busy worker's publication can come late; a
/// worker killed then takes its clients' handshakes with it, right when
/// the machine can least afford them coming back.
const BUSY_GRACE: u32 = 5;

/// Watches each worker's `LB_WORKERS` entry for progress: a worker whose
/// publication (every 100 ms) has not advanced for `timeouts.worker` and
/// that has had no CPU time since (stopped, deadlocked) is hung, and is
/// killed and restarted, since `SO_REUSEPORT` keeps handing it new clients.
/// One that still runs gets [`BUSY_GRACE`] times as long.
pub(super) struct Watchdog {
    pub(super) maps: crate::kernel::maps::StatMaps,
    pub(super) hung_after: Duration,
    /// Per slot.
    pub(super) seen: Vec<Seen>,
}

/// What the watchdog last saw of a slot's worker.
#[derive(Clone, Copy, Debug)]
pub(super) struct Seen {
    seq: u64,
    /// When `seq` last changed.
    at: Instant,
    /// The worker's CPU time (clock ticks) when its silence first passed
    /// `timeouts.worker`.
    cpu: Option<u64>,
    /// The busy warning was logged for this silence.
    said: bool,
}

impl Seen {
    pub(super) fn new(seq: u64) -> Self {
        Self { seq, at: Instant::now(), cpu: None, said: false }
    }
}

/// What a silent worker is.
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
/// silence passed `hung_after`, if looked at; `cpu_now`: now (`None`: unreadable).
fn judge(silent: Duration, hung_after: Duration, cpu_then: Option<u64>, cpu_now: Option<u64>) -> Judgement {
    match (cpu_then, cpu_now) {
        _ if silent <= hung_after => Judgement::Fine,
        (None, Some(_)) => Judgement::Look,
        (Some(then), Some(now)) if now > then && silent <= hung_after * BUSY_GRACE => Judgement::Busy,
        _ => Judgement::Hung,
    }
}

impl Watchdog {
    /// Kills the workers that stopped publishing and running; their exit
    /// restarts them.
    pub(super) fn check(&mut self, slots: &[Slot], workers: &Waits) {
        for (i, slot) in slots.iter().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let seq = self.maps.workers.get(&(i as u32), 0).ok().filter(|w| w.pid == u64::from(pid)).map(|w| w.seq);
            let seen = &mut self.seen[i];
            if let Some(s) = seq.filter(|s| *s != seen.seq) {
                *seen = Seen::new(s);
                continue;
            }
            let silent = seen.at.elapsed().min(slot.started.elapsed());
            let now = if silent > self.hung_after { lb_common::host::cpu_ticks(pid) } else { None };
            match judge(silent, self.hung_after, seen.cpu, now) {
                Judgement::Fine => {}
                Judgement::Look => seen.cpu = now,
                Judgement::Busy => {
                    if !std::mem::replace(&mut seen.said, true) {
                        log::warn!(
                            "worker {i} (pid {pid}): no heartbeat for {silent:.1?} but it is running: busy, not \
                             hung; it gets up to {:?}",
                            self.hung_after * BUSY_GRACE
                        );
                    }
                }
                Judgement::Hung => {
                    log::warn!(
                        "worker {i} (pid {pid}): no heartbeat for {:?} (timeouts.worker): hung; killing it",
                        self.hung_after
                    );
                    workers.signal(i, rustix::process::Signal::KILL);
                    *seen = Seen::new(0);
                }
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
        assert_eq!(judge(s(1), limit, None, None), Fine);
        // Past the limit: its CPU time is taken, and looked at again next time.
        assert_eq!(judge(s(3), limit, None, Some(500)), Look);
        assert_eq!(judge(s(3), limit, Some(500), Some(500)), Hung, "stopped or deadlocked");
        assert_eq!(judge(s(3), limit, Some(500), Some(501)), Busy);
        assert_eq!(judge(limit * BUSY_GRACE + s(1), limit, Some(500), Some(9000)), Hung, "spinning");
        assert_eq!(judge(s(3), limit, None, None), Hung, "gone, or /proc unreadable");
    }
}
