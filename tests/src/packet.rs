//! Hand-built frames for the XDP guard: its tests run them through the
//! program, `lb-xdp-flood` has the kernel send them. Besides a plain TCP
//! segment: VLAN tags, IPv6 extension headers and fragments, the headers
//! a guard has to look past to find TCP.

use std::net::{IpAddr, SocketAddr};

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let sum = bytes.chunks(2).fold(0u32, |a, c| {
        let a = a + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        (a & 0xffff) + (a >> 16)
    });
    !(sum as u16)
}

/// An IPv6 extension header between the IPv6 header and TCP.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options (16 bytes: a PadN option).
    HopByHop,
    /// A routing header (24 bytes, segments left 0).
    Routing,
    /// Destination options (8 bytes: a PadN option).
    DestOpts,
    /// A fragment header: `offset` in 8-byte units, `more` fragments follow.
    Fragment { offset: u16, more: bool },
}

impl Ext {
    /// The header's protocol number (what the header before it names).
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestOpts => 60,
        }
    }

    /// The header's bytes, `next` being the protocol after it.
    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // Length in 8-byte units beyond the first 8; PadN fills the rest.
            Ext::HopByHop => [&[next, 1, 1, 12][..], &[0; 12]].concat(),
            Ext::DestOpts => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // Type 253 (experimental), segments left 0: ignored by a receiver.
            Ext::Routing => [&[next, 2, 253, 0][..], &[0; 20]].concat(),
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                [&[next, 0][..], &field.to_be_bytes(), &0x1234_5678u32.to_be_bytes()].concat()
            }
        }
    }
}

/// An Ethernet frame to `mac` with a TCP segment (no payload) from `src`
/// (port 40000) to `dst` with `flags`, checksums filled in, IPv4 or IPv6.
pub fn tcp(mac: [u8; 6], src: IpAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    tcp_ext(mac, src, dst, flags, &[])
}

/// [`tcp`] with IPv6 extension headers `ext` (in that order) between the
/// IPv6 header and TCP. Panics for IPv4 with `ext`.
pub fn tcp_ext(mac: [u8; 6], src: IpAddr, dst: SocketAddr, flags: u8, ext: &[Ext]) -> Vec<u8> {
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
            assert!(ext.is_empty(), "IPv6 extension headers in an IPv4 packet");
            let addrs = [s.octets(), d.octets()].concat();
            let mut h = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            h.extend_from_slice(&addrs);
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            (0x0800u16, h, addrs)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let addrs = [s.octets(), d.octets()].concat();
            let mut chain = Vec::new();
            for (i, e) in ext.iter().enumerate() {
                let next = ext.get(i + 1).map_or(6, |n| n.number());
                chain.extend(e.bytes(next));
            }
            let first = ext.first().map_or(6, |e| e.number());
            let len = (chain.len() + tcp.len()) as u16;
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[first, 64]);
            h.extend_from_slice(&addrs);
            h.extend(chain);
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

/// 802.1Q tag protocol identifier (a customer VLAN).
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad tag protocol identifier (the outer tag of QinQ).
pub const TPID_8021AD: u16 = 0x88a8;

/// `frame` with VLAN tags inserted after the MAC addresses, outermost
/// first: each tag is its TPID and a TCI with VLAN id 100, 101, ...
pub fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (i, tpid) in tpids.iter().enumerate() {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

/// An untagged IPv4 `frame` made a fragment: `offset` in 8-byte units,
/// `more` fragments follow; the header checksum redone.
pub fn ipv4_fragment(frame: &[u8], offset: u16, more: bool) -> Vec<u8> {
    assert_eq!(frame[12..14], [0x08, 0x00], "not an untagged IPv4 frame");
    let mut out = frame.to_vec();
    let field = offset | if more { 0x2000 } else { 0 };
    out[20..22].copy_from_slice(&field.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&out[14..34]);
    out[24..26].copy_from_slice(&sum.to_be_bytes());
    out
}
