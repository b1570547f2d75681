//! Handshakes that differ between the client's connection and the
//! server's, on the packet plane across namespaces (`testkit::across`):
//! each is joined and byte-exact, or stays on the sockmap plane with its
//! reason counted, and byte-exact there too. The client's namespace gets
//! the difference (a sysctl, an MTU); lb's and the server's keep Linux's
//! defaults (timestamps, SACK, window scaling, MTU 1500).

use std::time::Duration;

use testkit::{
    KernelProof, Lb, Mode,
    across::{self, Across},
    netns::Triangle,
};

/// Connections per case, and what each sends and gets back after.
const CONNS: usize = 8;
const SIZES: [u64; 2] = [1 << 20, 100_000];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Joined,
    /// Kept on sockmap, counted under this reason.
    Kept(&'static str),
}

fn kept(lb: &Lb, reason: &str) -> u64 {
    lb.pinned_stats()["totals"][format!("packet_kept_{reason}")].as_u64().unwrap_or(0)
}

fn case(test: &str, prepare: impl FnOnce(&Triangle), want: Outcome) {
    let Some(x) = Across::start(Mode::Packet, test, prepare, across::echo) else { return };
    x.rt.block_on(async {
        let proof = KernelProof::start(&x.lb);
        let conns = across::hello_all(&x.tri.client.name, x.front, CONNS, test).await;
        match want {
            Outcome::Joined => {
                proof.await_joined(&x.lb, CONNS as u64, Duration::from_secs(10), test).await;
                assert_eq!(x.held_toward_server(), 0, "{test}: lb still holds sockets after the join");
            }
            Outcome::Kept(reason) => {
                let counted = testkit::retry_until(Duration::from_secs(5), || {
                    (kept(&x.lb, reason) >= CONNS as u64).then_some(())
                })
                .await;
                assert!(counted.is_some(), "{test}: want {CONNS} kept for {reason}: {}", x.lb.pinned_stats());
                assert_eq!(proof.joined(&x.lb), 0, "{test}: joined where it should stay on sockmap");
            }
        }
        let failed = across::bulk_both_ways(conns, &SIZES).await;
        assert!(failed.is_empty(), "{test}: {failed:?}");
        if want == Outcome::Joined {
            x.assert_sent_out(test);
            let ended = x.lb.all_ended(Duration::from_secs(10)).await;
            assert!(ended, "{test}: not every connection ended: {}", x.lb.pinned_stats());
        }
        eprintln!("[packet] {test}: {want:?}; {CONNS} connections byte-exact both ways");
    });
}

/// Sets `key` in the client's namespace.
fn client_sysctl(key: &'static str, value: &'static str) -> impl FnOnce(&Triangle) {
    move |t| t.client.within(|| t.client.sysctl(key, value))
}

#[test]
fn client_without_timestamps_stays_on_sockmap() {
    case("hs_no_timestamps", client_sysctl("net.ipv4.tcp_timestamps", "0"), Outcome::Kept("timestamps"));
}

#[test]
fn neither_with_timestamps_is_joined() {
    let prepare = |t: &Triangle| {
        for ns in [&t.client, &t.server] {
            ns.within(|| ns.sysctl("net.ipv4.tcp_timestamps", "0"));
        }
    };
    case("hs_no_timestamps_both", prepare, Outcome::Joined);
}

#[test]
fn client_without_sack_is_joined() {
    case("hs_no_sack", client_sysctl("net.ipv4.tcp_sack", "0"), Outcome::Joined);
}

#[test]
fn client_without_window_scaling_is_joined() {
    case("hs_no_wscale", client_sysctl("net.ipv4.tcp_window_scaling", "0"), Outcome::Joined);
}

#[test]
fn client_with_another_window_scale_is_joined() {
    case("hs_small_rmem", client_sysctl("net.ipv4.tcp_rmem", "4096 65536 1048576"), Outcome::Joined);
}

#[test]
fn client_behind_a_smaller_mtu_stays_on_sockmap() {
    case("hs_mtu_1400", |t| t.client_mtu(1400), Outcome::Kept("mss"));
}
