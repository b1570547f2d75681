//! Balancing algorithms: which server a new client goes to.
//!
//! The proxy passes the servers that may take new connections right now
//! (enabled, healthy, weight > 0), each with a stable id, its weight and its
//! live connection count; the balancer answers the order to try them in.

use std::{collections::HashMap, net::IpAddr, sync::Mutex};

use serde::Deserialize;

/// `balance = "…"` of a backend.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Smooth weighted round robin (as nginx): over every cycle of
    /// sum(weights) picks each server gets exactly its weight, interleaved.
    #[default]
    Roundrobin,
    /// Fewest live connections relative to weight; ties rotate.
    Leastconn,
    /// Consistent hash (Maglev) of the client IP: a client keeps its server,
    /// and adding or removing one of N servers moves about 1/N of clients.
    Source,
}

/// A server the balancer may choose.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// Stable identity (survives changes to the set).
    pub id: u64,
    pub weight: u32,
    pub active: u64,
}

/// Size of the Maglev lookup table (prime, ≫ servers × 100).
pub const MAGLEV_SIZE: usize = 65_537;

/// The (id, weight) set a Maglev table was built for, and the table.
type MaglevCache = (Vec<(u64, u32)>, Vec<u32>);

#[derive(Debug, Default)]
struct State {
    /// Smooth round robin: current weight per server id.
    current: HashMap<u64, i64>,
    /// Maglev table of candidate positions, and the set it was built for.
    maglev: Option<MaglevCache>,
    cursor: usize,
}

/// One backend's balancer.
#[derive(Debug, Default)]
pub struct Balancer {
    pub algorithm: Algorithm,
    state: Mutex<State>,
}

impl Balancer {
    pub fn new(algorithm: Algorithm) -> Self {
        Self { algorithm, state: Mutex::default() }
    }

    /// The order to try `c` in (indices into `c`); the first is the choice.
    pub fn order(&self, c: &[Candidate], client: IpAddr) -> Vec<usize> {
        if c.is_empty() {
            return vec![];
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = match self.algorithm {
            Algorithm::Roundrobin => smooth_pick(&mut st.current, c),
            Algorithm::Leastconn => {
                st.cursor = st.cursor.wrapping_add(1);
                let start = st.cursor % c.len();
                (0..c.len())
                    .map(|i| (start + i) % c.len())
                    .min_by(|&a, &b| {
                        // active/weight, compared without division.
                        (u128::from(c[a].active) * u128::from(c[b].weight))
                            .cmp(&(u128::from(c[b].active) * u128::from(c[a].weight)))
                    })
                    .unwrap_or(0)
            }
            Algorithm::Source => {
                let set: Vec<(u64, u32)> = c.iter().map(|x| (x.id, x.weight)).collect();
                if st.maglev.as_ref().is_none_or(|(s, _)| *s != set) {
                    let table = maglev_table(&set, MAGLEV_SIZE);
                    st.maglev = Some((set, table));
                }
                let table = &st.maglev.as_ref().expect("built above").1;
                table[(hash_ip(client) % MAGLEV_SIZE as u64) as usize] as usize
            }
        };
        let n = c.len();
        (0..n).map(|i| (first + i) % n).collect()
    }
}

/// nginx's smooth weighted round robin.
fn smooth_pick(current: &mut HashMap<u64, i64>, c: &[Candidate]) -> usize {
    current.retain(|id, _| c.iter().any(|x| x.id == *id));
    let total: i64 = c.iter().map(|x| i64::from(x.weight)).sum();
    let mut best = 0;
    let mut best_w = i64::MIN;
    for (i, x) in c.iter().enumerate() {
        let w = current.entry(x.id).or_insert(0);
        *w += i64::from(x.weight);
        if *w > best_w {
            best_w = *w;
            best = i;
        }
    }
    *current.get_mut(&c[best].id).expect("inserted above") -= total;
    best
}

/// splitmix64 finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Stable hash of a client address (the same in every worker and run).
pub fn hash_ip(ip: IpAddr) -> u64 {
    let v = match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    };
    mix((v as u64) ^ mix((v >> 64) as u64))
}

/// Weighted Maglev lookup table (Eisenbud et al., NSDI 2016): each server
/// walks its own permutation of the slots and claims the next free one, as
/// many times per round as its weight.
pub fn maglev_table(set: &[(u64, u32)], size: usize) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size];
    let perms: Vec<(u64, u64)> =
        set.iter().map(|(id, _)| (mix(*id) % size as u64, mix(id ^ 0x5bd1_e995) % (size as u64 - 1) + 1)).collect();
    let mut next = vec![0u64; set.len()];
    let mut filled = 0;
    if set.iter().all(|(_, w)| *w == 0) {
        return vec![0; size];
    }
    while filled < size {
        for (i, (_, weight)) in set.iter().enumerate() {
            for _ in 0..*weight {
                let (offset, skip) = perms[i];
                let mut slot = ((offset + next[i] * skip) % size as u64) as usize;
                while table[slot] != EMPTY {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % size as u64) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    return table;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights.iter().enumerate().map(|(i, w)| Candidate { id: 100 + i as u64, weight: *w, active: 0 }).collect()
    }
    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919))
    }

    #[test]
    fn roundrobin_is_smooth_and_exact_per_cycle() {
        let b = Balancer::new(Algorithm::Roundrobin);
        let c = cands(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| b.order(&c, ip(0))[0]).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0], "nginx's smooth sequence for 5,1,1");
        let c = cands(&[1, 2, 3]);
        let mut hits = [0; 3];
        for _ in 0..600 {
            hits[b.order(&c, ip(0))[0]] += 1;
        }
        assert_eq!(hits, [100, 200, 300]);
    }

    #[test]
    fn order_lists_every_candidate_once() {
        for alg in [Algorithm::Roundrobin, Algorithm::Leastconn, Algorithm::Source] {
            let mut o = Balancer::new(alg).order(&cands(&[1, 1, 1, 1]), ip(3));
            o.sort();
            assert_eq!(o, [0, 1, 2, 3], "{alg:?}");
        }
    }

    #[test]
    fn leastconn_follows_live_counts_and_weights() {
        let b = Balancer::new(Algorithm::Leastconn);
        let mut c = cands(&[1, 1, 2]);
        c[0].active = 10;
        c[1].active = 3;
        c[2].active = 8; // 4 per weight unit
        assert_eq!(b.order(&c, ip(0))[0], 1);
        c[1].active = 5; // now 5 vs 4: the heavier server wins
        assert_eq!(b.order(&c, ip(0))[0], 2);
        // Simulated: each pick adds a connection; weights 1:3 give 1:3 shares.
        let mut c = cands(&[1, 3]);
        let mut hits = [0; 2];
        for _ in 0..400 {
            let i = b.order(&c, ip(0))[0];
            c[i].active += 1;
            hits[i] += 1;
        }
        assert!((95..=105).contains(&hits[0]), "{hits:?}");
    }

    #[test]
    fn source_is_sticky_and_follows_weights() {
        let b = Balancer::new(Algorithm::Source);
        let c = cands(&[1, 1, 2]);
        let mut hits = [0usize; 3];
        for i in 0..10_000 {
            let first = b.order(&c, ip(i))[0];
            assert_eq!(first, b.order(&c, ip(i))[0], "a client must keep its server");
            hits[first] += 1;
        }
        for (h, want) in hits.iter().zip([2500, 2500, 5000]) {
            assert!(h.abs_diff(want) < 400, "weights 1:1:2 gave {hits:?}");
        }
    }

    #[test]
    fn source_moves_about_one_nth_when_a_server_goes() {
        let b = Balancer::new(Algorithm::Source);
        let all = cands(&[1; 10]);
        let before: Vec<u64> = (0..10_000).map(|i| all[b.order(&all, ip(i))[0]].id).collect();
        let removed = all[3].id;
        let rest: Vec<Candidate> = all.iter().copied().filter(|c| c.id != removed).collect();
        let after: Vec<u64> = (0..10_000).map(|i| rest[b.order(&rest, ip(i))[0]].id).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_removed = before.iter().filter(|&&s| s == removed).count();
        // Everyone on the removed server must move; few others may.
        assert!(moved >= on_removed);
        assert!(moved as f64 / 10_000.0 <= 0.10 + 0.03, "removing 1 of 10 moved {moved} of 10,000 clients");
        // And adding it back restores the old mapping for nearly everyone.
        let back: Vec<u64> = (0..10_000).map(|i| all[b.order(&all, ip(i))[0]].id).collect();
        assert_eq!(back, before, "the table must be a function of the server set");
    }
}
