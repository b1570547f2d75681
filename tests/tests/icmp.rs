//! Path MTU discovery through lb: client — lb — router — server, where
//! the router's link to the server carries 1400 bytes and the server still
//! announces an MSS of 1460 (its route's `advmss`), so the client's
//! full-size segments cannot pass the router, which says so to lb's
//! address with an ICMP "fragmentation needed". On the sockmap plane lb's
//! own socket takes it and sends smaller segments. On the packet plane lb
//! has no socket any more: the program translates the error for the
//! client, whose stack lowers its segments. Without that the client's
//! segments would be lost for good (a black hole) and the transfer would
//! never finish.

use std::{net::SocketAddr, time::Duration};

use testkit::{
    KernelProof, Lb, Mode, across,
    backends::{self, Backend},
    lbproc::kernel_available,
    netns::{NetNs, ip},
};

const FRONT: &str = "10.202.1.1:7000";
const SERVER: &str = "10.202.3.2:7001";

/// The four namespaces; this thread is in lb's.
struct Routed {
    client: NetNs,
    server: NetNs,
    _router: NetNs,
    _lb: NetNs,
}

fn routed(test: &str) -> Routed {
    let lb = NetNs::enter(test);
    let (client, router, server) = (NetNs::create(test), NetNs::create(test), NetNs::create(test));
    let (c, r, s) = (client.name.as_str(), router.name.as_str(), server.name.as_str());
    let steps: Vec<Vec<&str>> = vec![
        vec!["link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns", c],
        vec!["addr", "add", "10.202.1.1/24", "dev", "vc0"],
        vec!["link", "set", "vc0", "up"],
        vec!["-n", c, "addr", "add", "10.202.1.2/24", "dev", "eth0"],
        vec!["-n", c, "link", "set", "eth0", "up"],
        vec!["link", "add", "vr0", "type", "veth", "peer", "name", "eth0", "netns", r],
        vec!["addr", "add", "10.202.2.1/24", "dev", "vr0"],
        vec!["link", "set", "vr0", "up"],
        vec!["-n", r, "addr", "add", "10.202.2.2/24", "dev", "eth0"],
        vec!["-n", r, "link", "set", "eth0", "up"],
        vec!["-n", r, "link", "add", "eth1", "mtu", "1400", "type", "veth", "peer", "name", "eth0", "netns", s],
        vec!["-n", r, "addr", "add", "10.202.3.1/24", "dev", "eth1"],
        vec!["-n", r, "link", "set", "eth1", "up"],
        vec!["-n", s, "link", "set", "eth0", "mtu", "1400"],
        vec!["-n", s, "addr", "add", "10.202.3.2/24", "dev", "eth0"],
        vec!["-n", s, "link", "set", "eth0", "up"],
        vec!["-n", s, "route", "add", "default", "via", "10.202.3.1", "advmss", "1460"],
        vec!["route", "add", "10.202.3.0/24", "via", "10.202.2.2"],
    ];
    for args in steps {
        ip(&args).unwrap_or_else(|e| panic!("{test}: {e}"));
    }
    router.within(|| router.sysctl("net.ipv4.ip_forward", "1"));
    Routed { client, server, _router: router, _lb: lb }
}

fn through_a_smaller_mtu(mode: Mode) {
    let test = "icmp_frag_needed";
    if !kernel_available(test) {
        return;
    }
    let net = routed(test);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let at: SocketAddr = SERVER.parse().unwrap();
    let _be = rt.block_on(async {
        let l = net.server.within(|| backends::listen(at)).unwrap_or_else(|e| panic!("{test}: server {at}: {e}"));
        Backend::serve(l, across::echo)
    });
    let body = format!(
        "access_log = false\n[[frontend]]\nname = \"t\"\nlisten = \"{FRONT}\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{SERVER}\"]\n"
    );
    let Some(lb) = Lb::start_with(mode, test, &body) else { return };
    rt.block_on(async {
        let proof = KernelProof::start(&lb);
        let conns = across::hello_all(&net.client.name, FRONT.parse().unwrap(), 4, test).await;
        if mode == Mode::Packet {
            proof.await_joined(&lb, 4, Duration::from_secs(10), test).await;
        }
        static SIZES: [u64; 1] = [1 << 20];
        let failed = tokio::time::timeout(Duration::from_secs(30), across::bulk_both_ways(conns, &SIZES))
            .await
            .unwrap_or_else(|_| panic!("{test}: the transfers did not finish in 30 s: a black hole"));
        assert!(failed.is_empty(), "{test}: {failed:?}");
        proof.assert_kernel_ran(&lb, test);
        if mode == Mode::Packet {
            let p = lb.pinned_stats()["packet"].clone();
            let icmp = p["icmp"].as_u64().unwrap_or(0);
            assert!(icmp > 0, "{test}: no ICMP error was translated: {p}");
            eprintln!("[packet] {test}: {icmp} ICMP error(s) translated for the client");
        }
        eprintln!("[{}] {test}: 4 connections byte-exact both ways through a 1400-byte hop", mode.name());
    });
    drop(lb);
    drop(net);
}

#[test]
fn packet_path_mtu_discovery_through_a_smaller_hop() {
    through_a_smaller_mtu(Mode::Packet);
}

#[test]
fn kernel_path_mtu_discovery_through_a_smaller_hop() {
    through_a_smaller_mtu(Mode::Kernel);
}
