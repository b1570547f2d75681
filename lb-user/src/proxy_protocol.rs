//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`), written
//! to a server before any client byte so that it learns the client's
//! address: version 1 (text) or 2 (binary). A wire format, below
//! everything else: the config names a version, the proxy writes it.

use std::net::{IpAddr, SocketAddr};

use crate::addr::ip16;

/// `send_proxy = "…"` of a backend: the PROXY protocol header lb writes
/// to each server connection before any client byte.
#[derive(Clone, Copy, Debug, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// Text: `PROXY TCP4 <client ip> <frontend ip> <client port> <frontend port>\r\n`.
    V1,
    /// Binary; health checks send a `LOCAL` header.
    V2,
}

/// The v2 signature, then version 2 with command `LOCAL`, family and
/// protocol `UNSPEC`, no address: what a health check sends (the server
/// must take the connection as its own, not a client's).
pub const V2_LOCAL: [u8; 16] =
    [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00];

/// The header for a client at `client` that connected to `frontend` (the
/// address of lb it reached): TCP4 or TCP6. An IPv4 client seen through a
/// dual-stack IPv6 listener (`::ffff:a.b.c.d`) is given as IPv4.
pub fn header(version: SendProxy, client: SocketAddr, frontend: SocketAddr) -> Vec<u8> {
    let unmap = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (unmap(client), unmap(frontend));
    match version {
        SendProxy::V1 => v1(src, dst),
        SendProxy::V2 => v2(src, dst),
    }
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let line = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port()),
        (IpAddr::V6(s), IpAddr::V6(d)) => format!("PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port()),
        // Families differ (cannot happen on one connection, but the type allows it).
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    };
    line.into_bytes()
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + 36);
    h.extend_from_slice(&V2_LOCAL[..12]);
    // Version 2, command PROXY.
    h.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11); // AF_INET, STREAM
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            h.push(0x21); // AF_INET6, STREAM
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&ip16(s));
            h.extend_from_slice(&ip16(d));
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn v2_tcp4_matches_the_specification_vector() {
        let h = header(SendProxy::V2, "192.168.0.1:56324".parse().unwrap(), "192.168.0.11:443".parse().unwrap());
        assert_eq!(
            hex(&h),
            "0d0a0d0a000d0a515549540a".to_owned() + "21" + "11" + "000c" + "c0a80001" + "c0a8000b" + "dc04" + "01bb"
        );
    }

    #[test]
    fn v2_tcp6_and_local() {
        let h = header(SendProxy::V2, "[2001:db8::1]:1000".parse().unwrap(), "[::1]:443".parse().unwrap());
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(hex(&h[12..16]), "21210024");
        assert_eq!(hex(&h[16..32]), "20010db8000000000000000000000001");
        assert_eq!(hex(&h[32..48]), "00000000000000000000000000000001");
        assert_eq!(hex(&h[48..]), "03e801bb");
        assert_eq!(hex(&V2_LOCAL), "0d0a0d0a000d0a515549540a20000000");
    }

    #[test]
    fn v1_lines() {
        let h = header(SendProxy::V1, "192.168.0.1:56324".parse().unwrap(), "192.168.0.11:443".parse().unwrap());
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let h = header(SendProxy::V1, "[2001:db8::1]:1000".parse().unwrap(), "[::1]:443".parse().unwrap());
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 1000 443\r\n");
        // A v4 client through a dual-stack listener is a TCP4 client.
        let h = header(SendProxy::V1, "[::ffff:10.0.0.1]:5".parse().unwrap(), "[::ffff:10.0.0.2]:6".parse().unwrap());
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n");
        // The longest line fits the specification's 107 bytes.
        let a: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap();
        assert!(header(SendProxy::V1, a, a).len() <= 107);
    }
}
