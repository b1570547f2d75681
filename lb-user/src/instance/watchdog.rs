//! The supervisor's watchdog over hung workers.

use std::time::{Duration, Instant};

use super::{children::signal, supervisor::Slot};

/// Watches each worker's `LB_WORKERS` entry for progress: a worker whose
/// publication (every 100 ms) has not advanced for `timeouts.worker` is
/// hung (stopped, deadlocked) and is killed and restarted, since
/// `SO_REUSEPORT` keeps handing it new clients.
pub(super) struct Watchdog {
    pub(super) maps: crate::kernel::maps::StatMaps,
    pub(super) hung_after: Duration,
    /// Per slot: the last `seq` seen and when it changed.
    pub(super) seen: Vec<(u64, Instant)>,
}

impl Watchdog {
    /// Kills the workers that stopped publishing; their exit restarts them.
    pub(super) fn check(&mut self, slots: &[Slot]) {
        for (i, slot) in slots.iter().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let seq = self.maps.workers.get(&(i as u32), 0).ok().filter(|w| w.pid == u64::from(pid)).map(|w| w.seq);
            let seen = &mut self.seen[i];
            match seq {
                Some(s) if s != seen.0 => *seen = (s, Instant::now()),
                _ if seen.1.elapsed().min(slot.started.elapsed()) > self.hung_after => {
                    log::warn!(
                        "worker {i} (pid {pid}): no heartbeat for {:?} (timeouts.worker): hung; killing it",
                        self.hung_after
                    );
                    signal(pid, rustix::process::Signal::KILL);
                    *seen = (0, Instant::now());
                }
                _ => {}
            }
        }
    }
}
