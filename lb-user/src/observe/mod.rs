//! What lb tells about itself: the counters ([`counters`]), each
//! connection's end ([`conn`]: counters and the access log), the 100 ms
//! publication into the pinned maps ([`publish`]), reading them back for
//! `lb stats` and `lb conns` ([`read`], [`render`]), and `/metrics`.

pub mod conn;
pub mod counters;
pub mod metrics;
pub mod publish;
pub mod read;
pub mod render;

use std::time::{Duration, Instant};

/// How a listener lives through accept errors (out of descriptors, out of
/// memory): it logs at most every 5 s how many it saw, pauses, and goes on.
pub struct Backoff {
    what: &'static str,
    last_log: Option<Instant>,
    since_log: u64,
}

impl Backoff {
    /// Pause after a failed accept.
    pub const PAUSE: Duration = Duration::from_millis(50);
    const LOG_EVERY: Duration = Duration::from_secs(5);

    pub fn new(what: &'static str) -> Self {
        Self { what, last_log: None, since_log: 0 }
    }

    /// Records a failed accept, logs if it is time, and pauses.
    pub async fn failed(&mut self, e: &std::io::Error) {
        self.since_log += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            log::warn!("{}: accept failed {} time(s): {e}; retrying", self.what, self.since_log);
            self.last_log = Some(Instant::now());
            self.since_log = 0;
        }
        tokio::time::sleep(Self::PAUSE).await;
    }
}
