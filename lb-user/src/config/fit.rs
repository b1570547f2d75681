//! A configuration on maps an earlier instance made (`lb upgrade`, and
//! `lb run` taking over the holders of a supervisor that died). Those maps
//! hold the live connections, so they stay, with the capacities that
//! instance gave them; what this configuration would give them
//! ([`Shape::capacities`]) may be more: a larger `kernel_memory` or
//! `maxconn`, more workers, servers or source addresses, or a binary that
//! sizes them otherwise. Connections are what the maps bound, so `maxconn`
//! comes down to what they hold; listen backlogs or a guard they cannot
//! hold are refused; rows short for servers are only told (their stats
//! are not published).

use lb_common::maps::{
    CONN, Capacities, FLOW_CTL, FLOWS, GUARD_ALLOW, GUARD_DENY, GUARD_RATE, GUARD_TOP, HANDSHAKE, SERVER_BYTES,
    SERVERS, SOURCES, SPLICE, TARGET, TARGET_OK,
};

use super::memory::Shape;

/// How a configuration fits maps made earlier.
#[derive(Debug, PartialEq, Eq)]
pub struct Fit {
    /// The largest `maxconn`, at most the configuration's, whose connection
    /// maps fit the ones there.
    pub maxconn: u32,
    /// Maps of rows with less room than the configuration would give them:
    /// (map, its capacity, the configuration's).
    pub short: Vec<(&'static str, u32, u32)>,
}

/// The connection maps of `c`, named.
fn conn_maps(c: &Capacities) -> [(&'static str, u32); 6] {
    [
        (CONN, c.conn),
        (TARGET, c.target),
        (SPLICE, c.splice),
        (TARGET_OK, c.target_ok),
        (FLOWS, c.flows),
        (FLOW_CTL, c.flow_ctl),
    ]
}

/// How `shape` fits maps of capacities `have`; `Err`: why it cannot run on
/// them (the message names the map).
pub fn fit(shape: Shape, have: &Capacities) -> Result<Fit, String> {
    let want = shape.capacities();
    if shape.guard {
        let guard = [
            (GUARD_RATE, have.guard_sources, want.guard_sources),
            (GUARD_TOP, have.guard_sources, want.guard_sources),
            (GUARD_DENY, have.guard_rules, want.guard_rules),
            (GUARD_ALLOW, have.guard_rules, want.guard_rules),
        ];
        if let Some((map, h, w)) = guard.into_iter().find(|(_, h, w)| h < w) {
            return Err(format!(
                "[guard] needs {w} entries in {map}, which holds {h} (the maps were made without a guard)"
            ));
        }
    }
    if want.handshakes > have.handshakes {
        return Err(format!(
            "the packet plane needs {} entries in {HANDSHAKE}, which holds {} (the maps were made without a \
             frontend with splice = \"packet\")",
            want.handshakes, have.handshakes
        ));
    }
    let short_of = |m: u32| {
        let c = Shape { maxconn: m, ..shape }.capacities();
        conn_maps(&c).into_iter().zip(conn_maps(have)).find(|((_, w), (_, h))| w > h).map(|((n, w), (_, h))| (n, h, w))
    };
    let maxconn = match short_of(shape.maxconn) {
        None => shape.maxconn,
        Some(_) => {
            if let Some((map, h, w)) = short_of(1) {
                return Err(format!(
                    "{map} holds {h} entries; this configuration needs {w} for its listen backlogs ({} worker(s) × {} \
                     frontend(s)) and one connection",
                    shape.workers, shape.frontends
                ));
            }
            // Capacities grow with maxconn: fits at `lo`, not at `hi`.
            let (mut lo, mut hi) = (1, shape.maxconn);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if short_of(mid).is_none() { lo = mid } else { hi = mid }
            }
            lo
        }
    };
    let short = [
        (SERVERS, have.servers, want.servers),
        (SOURCES, have.sources, want.sources),
        (SERVER_BYTES, have.server_bytes, want.server_bytes),
    ]
    .into_iter()
    .filter(|(_, h, w)| h < w)
    .collect();
    Ok(Fit { maxconn, short })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(maxconn: u32, workers: u32) -> Shape {
        Shape {
            maxconn,
            workers,
            frontends: 1,
            servers: 3,
            pairs: 3,
            largest_pool: 1,
            kernel: true,
            guard: false,
            packet: false,
            cpus: 2,
        }
    }

    #[test]
    fn maps_of_the_same_configuration_fit_it() {
        let s = shape(10_000, 2);
        assert_eq!(fit(s, &s.capacities()), Ok(Fit { maxconn: 10_000, short: vec![] }));
        // Larger maps too.
        assert_eq!(fit(s, &shape(20_000, 4).capacities()).map(|f| f.maxconn), Ok(10_000));
    }

    /// A configuration asking for more connections than the maps were made
    /// for gets the most they hold: each worker's share of it, two sockets
    /// each, and the backlogs in `LB_TARGET`.
    #[test]
    fn maxconn_comes_down_to_what_the_maps_hold() {
        let made = shape(4, 1).capacities();
        assert_eq!(made.conn, 10, "two sockets for each of maxconn + 1 connections");
        let f = fit(shape(1000, 1), &made).unwrap();
        assert_eq!(f, Fit { maxconn: 4, short: vec![] });
        // Only LB_CONN smaller (the test hook LB_TEST_MAP_ENTRIES=LB_CONN:10).
        let hooked = Capacities { conn: 10, ..shape(1000, 1).capacities() };
        assert_eq!(fit(shape(1000, 1), &hooked).map(|f| f.maxconn), Ok(4));
        // One worker more: its backlog takes room in LB_TARGET_OK (made
        // for 60,001 connections and one backlog of 4,097 clients).
        let two = fit(shape(60_000, 2), &shape(60_000, 1).capacities()).unwrap();
        assert_eq!(two.maxconn, 60_001 - 4_097 - 2);
    }

    #[test]
    fn backlogs_or_a_guard_the_maps_cannot_hold_are_refused() {
        let made = shape(4, 1).capacities();
        let why = fit(shape(4, 2), &made).unwrap_err();
        assert_eq!(
            why,
            "LB_TARGET holds 4107 entries; this configuration needs 8200 for its listen backlogs (2 worker(s) × 1 \
             frontend(s)) and one connection"
        );
        let guarded = Shape { guard: true, ..shape(4, 1) };
        let why = fit(guarded, &made).unwrap_err();
        assert_eq!(
            why,
            "[guard] needs 65536 entries in LB_GUARD_RATE, which holds 1 (the maps were made without a guard)"
        );
        assert_eq!(fit(guarded, &guarded.capacities()).map(|f| f.maxconn), Ok(4));
    }

    #[test]
    fn rows_short_for_servers_are_told() {
        let made = shape(4, 1).capacities();
        let more = Shape { servers: 40, pairs: 40, ..shape(4, 1) };
        let f = fit(more, &made).unwrap();
        assert_eq!(f.maxconn, 4);
        assert_eq!(f.short, vec![(SERVERS, 70, 144), (SOURCES, 70, 144), (SERVER_BYTES, 70, 144)]);
    }

    /// The cap applies wherever the text is parsed with it (the supervisor,
    /// each worker, a reload), to the global `maxconn` and the maps' sizes;
    /// a frontend's own `maxconn` above it stays valid (the global bounds).
    #[test]
    fn the_cap_is_an_override() {
        use crate::config::{Config, Overrides, host::AlreadyChecked};
        let text = "maxconn = 1000\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\
                    maxconn = 500\n[[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n";
        let parse = |o: Overrides| Config::parse_on(&AlreadyChecked, "t.toml", text, &o).unwrap();
        assert_eq!(parse(Overrides::default()).maxconn, 1000);
        let c = parse(Overrides { maxconn: Some(4), ..Overrides::default() });
        assert_eq!((c.maxconn, c.memory.maxconn, c.frontends[0].maxconn), (4, 4, Some(500)));
        assert_eq!(
            parse(Overrides { maxconn: Some(5000), ..Overrides::default() }).maxconn,
            1000,
            "a cap, not a value"
        );
    }
}
