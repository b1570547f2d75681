//! What lb tells about itself: the counters ([`counters`]), each
//! connection's end ([`conn`]: counters and the access log), the 100 ms
//! publication into the pinned maps ([`publish`]), reading them back for
//! `lb stats` and `lb conns` ([`read`], [`render`]), and `/metrics`.

pub mod conn;
pub mod conns;
pub mod counters;
pub mod metrics;
pub mod publish;
pub mod read;
pub mod render;

use std::time::{Duration, Instant};

/// A warning that repeats under load: logged at most every 5 s, with how
/// often it happened since the last line.
#[derive(Debug, Default)]
pub struct Every {
    last_log: Option<Instant>,
    since_log: u64,
}

impl Every {
    const LOG_EVERY: Duration = Duration::from_secs(5);

    pub const fn new() -> Self {
        Self { last_log: None, since_log: 0 }
    }

    /// Counts one more; `Some(n)` when it is time to log the `n` seen.
    pub fn hit(&mut self) -> Option<u64> {
        self.since_log += 1;
        if self.last_log.is_some_and(|t| t.elapsed() < Self::LOG_EVERY) {
            return None;
        }
        self.last_log = Some(Instant::now());
        Some(std::mem::take(&mut self.since_log))
    }
}

/// How a listener lives through accept errors (out of descriptors, out of
/// memory): it logs at most every 5 s how many it saw, pauses, and goes on.
pub struct Backoff {
    what: &'static str,
    every: Every,
}

impl Backoff {
    /// Pause after a failed accept.
    pub const PAUSE: Duration = Duration::from_millis(50);

    pub fn new(what: &'static str) -> Self {
        Self { what, every: Every::new() }
    }

    /// Records a failed accept, logs if it is time, and pauses.
    pub async fn failed(&mut self, e: &std::io::Error) {
        if let Some(n) = self.every.hit() {
            log::warn!("{}: accept failed {n} time(s): {e}; retrying", self.what);
        }
        tokio::time::sleep(Self::PAUSE).await;
    }
}
