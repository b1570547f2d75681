//! Balancing algorithms: which server a new client goes to.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Picks server indices for a new connection, best first.
pub trait Balancer: Send + Sync {
    /// The first server to try; callers walk on with `next` after a failure.
    fn first(&self, n_servers: usize) -> usize;
    /// The server to try after `prev` failed.
    fn next(&self, prev: usize, n_servers: usize) -> usize {
        (prev + 1) % n_servers
    }
}

/// Plain round robin over the server list.
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursor: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn first(&self, n_servers: usize) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed) % n_servers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_every_server_evenly() {
        let rr = RoundRobin::default();
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[rr.first(3)] += 1;
        }
        assert_eq!(hits, [100, 100, 100]);
        assert_eq!(rr.next(2, 3), 0);
    }
}
