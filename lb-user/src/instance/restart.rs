//! Restarts under way, beside the supervisor's loop, which serves on
//! meanwhile. One that fails is tried again after a pause that doubles
//! from 1 s to 30 s; the other slots are not touched.

use std::time::Duration;

use tokio::{process::Child, task::JoinSet};

use super::{
    children::{Started, spawn_holder, spawn_worker},
    holder::HolderSpec,
    worker::WorkerSpec,
};

/// A worker that dies sooner than this after its start is restarted only
/// after this long, so a crash loop does not spin.
pub(super) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// The longest pause between two tries to restart a worker or a holder.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// The pause before the next try after `failures` restarts of a slot's
/// worker (or holder) failed in a row: 1 s, doubling, at most 30 s.
pub(super) fn retry_pause(failures: u32) -> Duration {
    (MIN_LIFETIME * 2u32.pow(failures.saturating_sub(1).min(5))).min(MAX_RETRY_PAUSE)
}

#[derive(Default)]
pub(super) struct Restarts {
    /// (slot, commands replayed, failures so far, outcome).
    pub(super) workers: JoinSet<(usize, usize, u32, anyhow::Result<Started>)>,
    /// (slot, failures so far, the child and its pid).
    pub(super) holders: JoinSet<(usize, u32, anyhow::Result<Holder>)>,
}

/// A holder started: its process and pid.
type Holder = (Child, u32);

impl Restarts {
    /// Starts slot `i`'s worker from `spec` (made when `replayed` commands
    /// were logged) after `pause`.
    pub(super) fn worker(&mut self, i: usize, spec: WorkerSpec, replayed: usize, pause: Duration, failures: u32) {
        self.workers.spawn(async move {
            tokio::time::sleep(pause).await;
            (i, replayed, failures, spawn_worker(spec).await)
        });
    }

    /// Starts slot `i`'s holder from `spec` after `pause`.
    pub(super) fn holder(&mut self, i: usize, spec: HolderSpec, pause: Duration, failures: u32) {
        self.holders.spawn(async move {
            tokio::time::sleep(pause).await;
            (i, failures, spawn_holder(&spec).await.map(|(child, pid, _)| (child, pid)))
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_pause_doubles_up_to_half_a_minute() {
        let s: Vec<Duration> = (1..=8).map(super::retry_pause).collect();
        let want = [1, 2, 4, 8, 16, 30, 30, 30].map(Duration::from_secs);
        assert_eq!(s, want);
    }
}
