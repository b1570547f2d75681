//! The XDP guard on frames whose TCP header sits behind other headers:
//! VLAN tags (802.1Q, QinQ), IPv6 extension headers and fragments; and
//! sources that rotate addresses inside one IPv6 /64. Hand-built frames
//! through `BPF_PROG_TEST_RUN` (ordinary mode: verdicts returned, not acted
//! on) of the program lb pinned, with lb's own maps; the counters exactly.

use std::net::{IpAddr, SocketAddr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use testkit::{
    Lb,
    lbproc::{kernel_available, scratch},
    netns::NetNs,
    packet::{Ext, TPID_8021AD, TPID_8021Q, ipv4_fragment, tagged, tcp_ext},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// lb with a guard (`10.9.0.0/16` and `2001:db8:bad::/48` denied, 1 SYN per
/// second with a burst of 3) on a veth whose peer stays down, so that no
/// frame but the test's reaches the program; and the pinned program.
/// Fields drop in order: the program, then lb, then the namespace.
struct Lab {
    prog: Xdp,
    lb: Lb,
    _ns: NetNs,
}

impl Lab {
    fn start(test: &str) -> Option<Lab> {
        if !kernel_available(test) {
            return None;
        }
        let ns = NetNs::enter(test);
        for args in [&["link", "add", "g0", "type", "veth", "peer", "name", "g1"][..], &["link", "set", "g0", "up"]] {
            let out = std::process::Command::new("ip").args(args).output().expect("running ip");
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        let (dir, pin_path) = scratch();
        let cfg = format!(
            "dataplane = \"kernel\"\npin_path = \"{}\"\n\
             [guard]\ninterfaces = [\"g0\"]\ndeny = [\"10.9.0.0/16\", \"2001:db8:bad::/48\"]\n\
             syn_rate = 1\nsyn_burst = 3\n\
             [[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:7000\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n",
            pin_path.display()
        );
        let lb = Lb::launch(test, dir, pin_path.clone(), &cfg);
        let prog = Xdp::from_pin(pin_path.join("lb_guard"), aya_obj::programs::XdpAttachType::Interface)
            .unwrap_or_else(|e| panic!("{test}: pinned lb_guard: {e}"));
        Some(Lab { prog, lb, _ns: ns })
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        self.prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// The guard's counters and top sources, from `lb stats --json`.
    fn stats(&self) -> serde_json::Value {
        self.lb.pinned_stats()["guard"].clone()
    }
}

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn front() -> SocketAddr {
    "127.0.0.1:7000".parse().unwrap()
}

fn front6() -> SocketAddr {
    "[::1]:7000".parse().unwrap()
}

fn seg(src: &str, dst: SocketAddr, flags: u8, ext: &[Ext]) -> Vec<u8> {
    tcp_ext([0; 6], a(src), dst, flags, ext)
}

/// A tagged frame meets the deny list and the SYN limit as an untagged one
/// does: one 802.1Q tag, or an 802.1ad tag around an 802.1Q one (QinQ).
/// A third tag is more than the guard reads: dropped, and counted.
#[test]
fn vlan_tagged_frames_meet_the_deny_list_and_the_syn_limit() {
    let Some(lab) = Lab::start("guard_vlan") else { return };
    let q = [TPID_8021Q];
    let qinq = [TPID_8021AD, TPID_8021Q];
    let denied = seg("10.9.2.2", front(), SYN, &[]);
    assert_eq!(lab.run(&tagged(&denied, &q)), XDP_DROP, "denied source, 802.1Q");
    assert_eq!(lab.run(&tagged(&denied, &qinq)), XDP_DROP, "denied source, QinQ");
    assert_eq!(lab.run(&tagged(&seg("10.9.2.2", front(), ACK, &[]), &q)), XDP_DROP, "denied ACK, 802.1Q");
    let denied6 = seg("2001:db8:bad::1", front6(), SYN, &[]);
    assert_eq!(lab.run(&tagged(&denied6, &qinq)), XDP_DROP, "denied IPv6 source, QinQ");
    assert_eq!(lab.run(&tagged(&seg("10.8.0.1", front(), SYN, &[]), &q)), XDP_PASS, "a source not denied, 802.1Q");

    // The SYN limit behind tags: one bucket whatever the tags.
    let syn = seg("192.0.2.7", front(), SYN, &[]);
    assert_eq!(lab.run(&tagged(&syn, &q)), XDP_PASS, "SYN 1 of the burst, 802.1Q");
    assert_eq!(lab.run(&tagged(&syn, &qinq)), XDP_PASS, "SYN 2 of the burst, QinQ");
    assert_eq!(lab.run(&syn), XDP_PASS, "SYN 3 of the burst, untagged");
    assert_eq!(lab.run(&tagged(&syn, &q)), XDP_DROP, "SYN over the rate, 802.1Q");
    assert_eq!(lab.run(&tagged(&syn, &qinq)), XDP_DROP, "SYN over the rate, QinQ");
    assert_eq!(lab.run(&tagged(&seg("192.0.2.7", front(), ACK, &[]), &qinq)), XDP_PASS, "ACK of a limited source");
    let syn6 = seg("2001:db8:1::7", front6(), SYN, &[]);
    for i in 0..3 {
        assert_eq!(lab.run(&tagged(&syn6, &q)), XDP_PASS, "IPv6 SYN {i} of the burst, 802.1Q");
    }
    assert_eq!(lab.run(&tagged(&syn6, &q)), XDP_DROP, "IPv6 SYN over the rate, 802.1Q");

    // Not IP behind a tag: passed. Three tags: dropped, whatever is inside.
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(lab.run(&tagged(&arp, &qinq)), XDP_PASS, "ARP, QinQ");
    let three = [TPID_8021AD, TPID_8021Q, TPID_8021Q];
    assert_eq!(lab.run(&tagged(&seg("10.8.0.1", front(), ACK, &[]), &three)), XDP_DROP, "three tags");
    assert_eq!(lab.run(&tagged(&denied, &q)[..17]), XDP_PASS, "truncated inside the tag");

    let g = lab.stats();
    let counters = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("no guard counter {k}: {g}"));
    assert_eq!(counters("denied"), 4, "{g}");
    assert_eq!(counters("rate_limited"), 3, "{g}");
    assert_eq!(counters("unparsed"), 1, "{g}");
    assert_eq!(counters("fragments"), 0, "{g}");
    assert_eq!(counters("passed"), 10, "{g}");
    assert_eq!(g["top"][0], serde_json::json!({"source": "10.9.2.2", "dropped": 3}), "{g}");
}

/// An IPv6 SYN behind extension headers is limited as a bare one is: the
/// guard walks up to four (hop-by-hop, routing, destination options,
/// fragment) to find TCP. A longer chain is dropped; a fragment that is not
/// the first (no TCP header in it) meets the deny list, then passes, counted.
#[test]
fn ipv6_extension_headers_do_not_skip_the_syn_limit() {
    let Some(lab) = Lab::start("guard_ext") else { return };
    let hbh = [Ext::HopByHop];
    for i in 0..3 {
        assert_eq!(lab.run(&seg("2001:db8:1::7", front6(), SYN, &hbh)), XDP_PASS, "SYN {i} of the burst, hop-by-hop");
    }
    assert_eq!(lab.run(&seg("2001:db8:1::7", front6(), SYN, &hbh)), XDP_DROP, "SYN over the rate, hop-by-hop");
    assert_eq!(lab.run(&seg("2001:db8:1::7", front6(), SYN, &[])), XDP_DROP, "SYN over the rate, bare");
    assert_eq!(lab.run(&seg("2001:db8:1::7", front6(), ACK, &hbh)), XDP_PASS, "ACK of a limited source, hop-by-hop");

    // Four headers, the last a first fragment (offset 0, more follow).
    let four = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::Fragment { offset: 0, more: true }];
    for i in 0..3 {
        assert_eq!(lab.run(&seg("2001:db8:2::7", front6(), SYN, &four)), XDP_PASS, "SYN {i}, four headers");
    }
    assert_eq!(lab.run(&seg("2001:db8:2::7", front6(), SYN, &four)), XDP_DROP, "SYN over the rate, four headers");

    // Five headers: more than the guard walks, dropped even as an ACK from
    // a source not limited; an allowed or denied source is decided first.
    let five = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts, Ext::DestOpts];
    assert_eq!(lab.run(&seg("2001:db8:3::7", front6(), ACK, &five)), XDP_DROP, "five extension headers");
    assert_eq!(lab.run(&seg("2001:db8:bad::1", front6(), SYN, &five)), XDP_DROP, "denied, five headers");

    // Not the first fragment: no TCP header to read. Denied: dropped; else
    // passed (the kernel reassembles nothing without the first fragment,
    // which the guard checked), even from a limited source.
    let later = [Ext::HopByHop, Ext::Fragment { offset: 185, more: false }];
    assert_eq!(lab.run(&seg("2001:db8:1::7", front6(), SYN, &later)), XDP_PASS, "a later fragment");
    assert_eq!(lab.run(&seg("2001:db8:bad::1", front6(), SYN, &later)), XDP_DROP, "a denied later fragment");
    assert_eq!(lab.run(&seg("2001:db8:bad::1", front6(), ACK, &hbh)), XDP_DROP, "denied, hop-by-hop");

    // IPv4: a later fragment passes; one at offset 8 bytes (which could
    // rewrite the first fragment's TCP flags, RFC 1858) is dropped.
    let syn4 = seg("192.0.2.7", front(), SYN, &[]);
    assert_eq!(lab.run(&ipv4_fragment(&syn4, 185, false)), XDP_PASS, "IPv4 later fragment");
    assert_eq!(lab.run(&ipv4_fragment(&syn4, 1, true)), XDP_DROP, "IPv4 TCP fragment at offset 8");
    assert_eq!(lab.run(&ipv4_fragment(&syn4, 0, true)), XDP_PASS, "IPv4 first fragment, SYN 1 of the burst");

    let g = lab.stats();
    let counters = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("no guard counter {k}: {g}"));
    assert_eq!(counters("rate_limited"), 3, "{g}");
    assert_eq!(counters("denied"), 3, "{g}");
    assert_eq!(counters("unparsed"), 2, "{g}");
    assert_eq!(counters("fragments"), 2, "{g}");
    assert_eq!(counters("passed"), 10, "{g}");
}

/// 100 SYNs from 100 addresses of one IPv6 /64 share one bucket (a burst
/// of 3): a source rotating its address inside its /64 is one source.
/// Another /64 has its own bucket; IPv4 sources keep one per address.
/// `lb stats` names the /64 among the top dropped sources.
#[test]
fn addresses_of_one_ipv6_64_share_one_bucket() {
    let Some(lab) = Lab::start("guard_64") else { return };
    let mut passed = 0;
    for i in 1..=100u32 {
        let src = format!("2001:db8:1:2:{:x}:{:x}::{i:x}", i * 7919 % 65536, i * 104_729 % 65536);
        if lab.run(&seg(&src, front6(), SYN, &[])) == XDP_PASS {
            passed += 1;
        }
    }
    assert_eq!(passed, 3, "of 100 SYNs from one /64, {passed} passed (burst 3)");
    assert_eq!(lab.run(&seg("2001:db8:1:3::1", front6(), SYN, &[])), XDP_PASS, "the next /64");
    for src in ["192.0.2.1", "192.0.2.2"] {
        for i in 0..3 {
            assert_eq!(lab.run(&seg(src, front(), SYN, &[])), XDP_PASS, "{src}: SYN {i} of the burst");
        }
    }
    let g = lab.stats();
    assert_eq!(g["rate_limited"].as_u64(), Some(97), "{g}");
    assert_eq!(g["top"][0], serde_json::json!({"source": "2001:db8:1:2::/64", "dropped": 97}), "{g}");
    let show = lab.lb.ctl(&["guard", "show"]);
    assert!(show.contains("2001:db8:1:2::/64 (97)"), "{show}");
}
