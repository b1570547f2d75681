//! Balancing algorithms: which server a new client goes to.
//!
//! The proxy passes the servers that may take new connections right now
//! (enabled, healthy, weight > 0), each with its identity (a hash of its
//! address, see [`identity`]), its weight and its live connection count;
//! the balancer answers the order to try them in. State is keyed by that
//! identity, so a server removed and added again, or listed in another
//! order, keeps its place: with `source`, only the clients whose server
//! changed move.

use std::{collections::HashMap, net::IpAddr, sync::Mutex};

use crate::addr::{ServerAddr, ip16};
pub use crate::config::Algorithm;

/// A server's identity: a hash of its address, the same in every process
/// and run, whatever else changes.
pub fn identity(addr: ServerAddr) -> u64 {
    let ip = u128::from_be_bytes(ip16(addr.0.ip()));
    mix((ip as u64) ^ mix((ip >> 64) as u64 ^ u64::from(addr.0.port())))
}

/// A server the balancer may choose.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// [`identity`] of its address.
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
                // Built over the set sorted by identity, so the order the
                // servers are listed in does not matter.
                let mut set: Vec<(u64, u32)> = c.iter().map(|x| (x.id, x.weight)).collect();
                set.sort_unstable();
                let (built, table) = match st.maglev.take() {
                    Some((built, table)) if built == set => (built, table),
                    _ => {
                        let table = maglev_table(&set, MAGLEV_SIZE);
                        (set, table)
                    }
                };
                let id = built[table[(hash_ip(client) % MAGLEV_SIZE as u64) as usize] as usize].0;
                st.maglev = Some((built, table));
                c.iter().position(|x| x.id == id).unwrap_or(0)
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
    if let Some(w) = current.get_mut(&c[best].id) {
        *w -= total;
    }
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

    fn addr(i: u16) -> ServerAddr {
        ServerAddr(format!("10.1.0.{}:{}", i % 250 + 1, 9000 + i).parse().unwrap())
    }

    fn servers(n: u16) -> Vec<Candidate> {
        (0..n).map(|i| Candidate { id: identity(addr(i)), weight: 1, active: 0 }).collect()
    }

    #[test]
    fn identity_is_a_function_of_the_address() {
        assert_eq!(identity(addr(3)), identity(addr(3)));
        assert_ne!(identity(addr(3)), identity(addr(4)));
        let v4: ServerAddr = ServerAddr("10.0.0.1:80".parse().unwrap());
        let v6: ServerAddr = ServerAddr("[::ffff:10.0.0.1]:80".parse().unwrap());
        assert_eq!(identity(v4), identity(v6), "an IPv4 server and its mapped IPv6 form are one server");
    }

    /// Removing a server and adding it back (as a reload of its `maxconn`
    /// does), or listing the servers in another order, moves no client.
    #[test]
    fn source_follows_identity_not_position() {
        let b = Balancer::new(Algorithm::Source);
        let all = servers(8);
        let pick = |set: &[Candidate], i: u32| set[b.order(set, ip(i))[0]].id;
        let before: Vec<u64> = (0..5_000).map(|i| pick(&all, i)).collect();
        let mut reordered = all.clone();
        reordered.reverse();
        reordered.swap(1, 5);
        let after: Vec<u64> = (0..5_000).map(|i| pick(&reordered, i)).collect();
        assert_eq!(before, after, "reordering the servers moved clients");
        // Remove server 2, then add it back at the end of the list.
        let mut without: Vec<Candidate> = all.iter().copied().filter(|c| c.id != all[2].id).collect();
        let moved = (0..5_000).filter(|&i| pick(&without, i) != before[i as usize]).count();
        let on_removed = before.iter().filter(|&&s| s == all[2].id).count();
        assert!(moved >= on_removed, "every client of the removed server moves");
        assert!(
            moved - on_removed <= 5_000 / 50,
            "removing one of 8 servers moved {moved} clients ({on_removed} were its own)"
        );
        without.push(all[2]);
        let back: Vec<u64> = (0..5_000).map(|i| pick(&without, i)).collect();
        assert_eq!(back, before, "a server added back must get exactly its clients back");
    }

    /// Round robin's rotation state follows a server through a remove and
    /// re-add: weights 1:1:2 still give exactly 1:1:2 per cycle.
    #[test]
    fn roundrobin_keeps_shares_across_remove_and_add() {
        let b = Balancer::new(Algorithm::Roundrobin);
        let mut c = servers(3);
        c[2].weight = 2;
        for _ in 0..7 {
            b.order(&c, ip(0));
        }
        let removed = c.remove(1);
        b.order(&c, ip(0));
        c.insert(0, removed);
        let mut hits: HashMap<u64, u32> = HashMap::new();
        for _ in 0..400 {
            *hits.entry(c[b.order(&c, ip(0))[0]].id).or_default() += 1;
        }
        let share = |i: usize| hits[&c[i].id];
        assert_eq!((share(0), share(1), share(2)), (100, 100, 200), "{hits:?}");
    }

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
