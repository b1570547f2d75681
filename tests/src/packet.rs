//! Hand-built frames for the XDP guard: its tests run them through the
//! program, `lb-xdp-flood` has the kernel send them.

use std::net::{IpAddr, SocketAddr};

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let sum = bytes.chunks(2).fold(0u32, |a, c| {
        let a = a + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        (a & 0xffff) + (a >> 16)
    });
    !(sum as u16)
}

/// An Ethernet frame to `mac` with a TCP segment (no payload) from `src`
/// (port 40000) to `dst` with `flags`, checksums filled in, IPv4 or IPv6.
pub fn tcp(mac: [u8; 6], src: IpAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut frame = mac.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    let (ethertype, ip, addrs) = match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let addrs = [s.octets(), d.octets()].concat();
            let mut h = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            h.extend_from_slice(&addrs);
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            (0x0800u16, h, addrs)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let addrs = [s.octets(), d.octets()].concat();
            let mut h = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            h.extend_from_slice(&addrs);
            (0x86dd, h, addrs)
        }
        _ => panic!("mixed families"),
    };
    // TCP checksum over the pseudo-header (addresses, protocol, length).
    let pseudo = [&addrs[..], &[0, 6, 0, 20], &tcp].concat();
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend(ip);
    frame.extend(tcp);
    frame
}
