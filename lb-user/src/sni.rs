//! The server name (SNI) of a TLS ClientHello, read from bytes peeked at
//! the client socket (nothing is consumed: the backend gets every byte
//! unchanged; lb never terminates TLS). The records are reassembled here,
//! however the client split them; the handshake message and its extensions
//! are parsed by `tls-parser`.

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_message_handshake,
};

/// Most bytes lb looks at for one ClientHello: one full TLS record and its
/// header. A larger ClientHello is refused as [`Hello::Invalid`].
pub const MAX_HELLO: usize = 5 + 16 * 1024;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello has begun but is not complete yet.
    NeedMore,
    /// Not TLS (the first byte is no TLS handshake record).
    NotTls,
    /// TLS, but not a ClientHello lb can read; the reason.
    Invalid(&'static str),
    /// A complete ClientHello, with its host name if it names one
    /// (lowercase, without a trailing dot).
    Complete(Option<String>),
}

/// Reads `buf`, the first bytes a client sent.
pub fn server_name(buf: &[u8]) -> Hello {
    const HANDSHAKE: u8 = 0x16;
    match buf {
        [] => return Hello::NeedMore,
        [b, ..] if *b != HANDSHAKE => return Hello::NotTls,
        [_, major, ..] if *major != 3 => return Hello::NotTls,
        _ => {}
    }
    // The handshake bytes, from as many records as they span.
    let mut hs = Vec::new();
    let mut at = 0;
    let need = loop {
        let Some(header) = buf.get(at..at + 5) else {
            return if at + 5 > MAX_HELLO { Hello::Invalid("ClientHello larger than 16 KiB") } else { Hello::NeedMore };
        };
        if header[0] != HANDSHAKE {
            return Hello::Invalid("a record other than a handshake inside the ClientHello");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::Invalid("TLS record length out of range");
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            return if at + 5 + len > MAX_HELLO {
                Hello::Invalid("ClientHello larger than 16 KiB")
            } else {
                Hello::NeedMore
            };
        };
        hs.extend_from_slice(fragment);
        at += 5 + len;
        if let [kind, a, b, c, ..] = hs[..] {
            if kind != 1 {
                return Hello::Invalid("the first handshake message is not a ClientHello");
            }
            let need = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
            if need > MAX_HELLO {
                return Hello::Invalid("ClientHello larger than 16 KiB");
            }
            if hs.len() >= need {
                break need;
            }
        }
    };
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(&hs[..need])
    else {
        return Hello::Invalid("malformed ClientHello");
    };
    let Some(ext) = hello.ext else { return Hello::Complete(None) };
    let Ok((_, exts)) = parse_tls_client_hello_extensions(ext) else {
        return Hello::Invalid("malformed ClientHello extensions");
    };
    for e in exts {
        if let TlsExtension::SNI(names) = e {
            let Some((_, name)) = names.into_iter().find(|(t, _)| *t == SNIType::HostName) else {
                return Hello::Complete(None);
            };
            return match std::str::from_utf8(name) {
                Ok(n) if !n.is_empty() && n.len() <= 253 && n.bytes().all(|b| b.is_ascii_graphic()) => {
                    Hello::Complete(Some(n.trim_end_matches('.').to_ascii_lowercase()))
                }
                _ => Hello::Invalid("server name is not a host name"),
            };
        }
    }
    Hello::Complete(None)
}

/// A minimal TLS 1.3 ClientHello naming `name` (none: no SNI extension),
/// as one record: what the tests and the fuzzer start from.
pub fn client_hello(name: Option<&str>) -> Vec<u8> {
    let mut ext = Vec::new();
    if let Some(n) = name {
        let n = n.as_bytes();
        let list_len = (n.len() + 3) as u16;
        ext.extend_from_slice(&0u16.to_be_bytes()); // server_name
        ext.extend_from_slice(&(list_len + 2).to_be_bytes());
        ext.extend_from_slice(&list_len.to_be_bytes());
        ext.push(0); // host_name
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
    }
    // supported_versions: TLS 1.3, as real clients send.
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_prefixes() {
        let h = client_hello(Some("A.Example."));
        assert_eq!(server_name(&h), Hello::Complete(Some("a.example".into())));
        assert_eq!(server_name(&client_hello(None)), Hello::Complete(None));
        for cut in 0..h.len() {
            assert_eq!(server_name(&h[..cut]), Hello::NeedMore, "prefix of {cut} bytes");
        }
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(server_name(&[0x16, 0x02]), Hello::NotTls);
        assert!(matches!(server_name(&[0x16, 0x03, 0x01, 0x00, 0x00]), Hello::Invalid(_)));
    }

    /// One handshake message split over several records, as a client may send it.
    #[test]
    fn handshake_over_several_records() {
        let h = client_hello(Some("split.example"));
        let hs = &h[5..];
        let mut recs = Vec::new();
        for part in hs.chunks(7) {
            recs.extend_from_slice(&[0x16, 0x03, 0x01]);
            recs.extend_from_slice(&(part.len() as u16).to_be_bytes());
            recs.extend_from_slice(part);
        }
        assert_eq!(server_name(&recs), Hello::Complete(Some("split.example".into())));
        assert_eq!(server_name(&recs[..recs.len() - 1]), Hello::NeedMore);
    }

    /// Random bytes and mutated ClientHellos: never a panic, and a bounded
    /// answer (the peek buffer is MAX_HELLO, so NeedMore at that size means
    /// the parser asked for more than it may).
    #[test]
    fn fuzz_never_panics() {
        use proptest::prelude::*;
        let valid = client_hello(Some("fuzz.example"));
        let mutated = (0..valid.len(), any::<u8>(), 0..=valid.len()).prop_map(move |(i, b, cut)| {
            let mut v = valid.clone();
            v[i] = b;
            v.truncate(cut.max(i + 1));
            v
        });
        let input = prop_oneof![proptest::collection::vec(any::<u8>(), 0..600), mutated];
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 20_000,
            failure_persistence: None,
            ..Default::default()
        });
        runner
            .run(&input, |bytes| {
                let _ = server_name(&bytes);
                let mut big = bytes.clone();
                big.resize(MAX_HELLO, 0);
                prop_assert!(server_name(&big) != Hello::NeedMore, "NeedMore with a full buffer");
                Ok(())
            })
            .unwrap();
    }
}
