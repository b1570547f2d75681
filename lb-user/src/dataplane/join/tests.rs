use super::*;

fn hs(snd_base: u32, rcv_base: u32, peer_tsval: u32, at_ms: u32) -> Handshake {
    Handshake { snd_base, rcv_base, peer_tsval, mss: 1460, at_ms }
}

#[test]
fn offsets_map_each_stream_onto_the_other() {
    // The client socket's stream starts at 1000, the client's at 5000;
    // the server socket's at 90_000 (a 10-byte header first), the
    // server's at u32::MAX - 2 (it wraps).
    // Clocks, as offsets from the kernel's TCP clock: the client's -900
    // (its TSval 100 read at 1000), lb's client socket's 5000, the
    // server's 6,999,000, lb's server socket's 300.
    let (c, s) = (hs(1000, 5000, 100, 1000), hs(90_000, u32::MAX - 2, 7_000_000, 1000));
    let [to_s, to_c] = joined([Flow::default(); 2], [&c, &s], 10, [(7, 9), (6, 7)], Some([5000, 300]));
    // The client's byte 42 is the server's byte 52 (after the header).
    assert_eq!(5042u32.wrapping_add(to_s.seq_add), 90_052);
    // The client acknowledging lb's client stream up to byte 3 acks
    // the server's stream up to byte 3 (across the wrap).
    assert_eq!(1003u32.wrapping_add(to_s.ack_add), (u32::MAX - 2).wrapping_add(3));
    assert_eq!((u32::MAX - 2).wrapping_add(3).wrapping_add(to_c.seq_add), 1003);
    assert_eq!(90_052u32.wrapping_add(to_c.ack_add), 5042);
    // At 2000 the client's TSval is 1100 and the server's 7,001,000:
    // each goes out where the socket its receiver talked to stands then
    // (2300, 7000; TS_AHEAD ahead), and its echo comes back as it was sent.
    let out = 1100u32.wrapping_add(to_s.tsval_add);
    assert_eq!(out, 2300 + TS_AHEAD);
    assert_eq!(out.wrapping_add(to_c.tsecr_add), 1100);
    let back = 7_001_000u32.wrapping_add(to_c.tsval_add);
    assert_eq!(back, 7000 + TS_AHEAD);
    assert_eq!(back.wrapping_add(to_s.tsecr_add), 7_001_000);
    assert_eq!((to_s.win_in, to_s.win_out, to_c.win_in, to_c.win_out), (7, 7, 6, 9));
    assert_eq!((to_s.state, to_c.state), (JOINED, JOINED));
}

#[test]
fn what_cannot_be_translated_keeps_the_connection() {
    // lb's sockets' advmss: their MSS of 1460 less the timestamp option.
    let i = |options, advmss| Info { options, wscale: (7, 7), advmss: advmss - TS_OPTION };
    let (h, h0) = (hs(0, 0, 5, 1), hs(0, 0, 0, 0));
    assert_eq!(check(&i(7, 1460), &i(7, 1460), &h, &h), Ok(true));
    let no_ts = Info { options: 6, wscale: (7, 7), advmss: 1460 };
    assert_eq!(check(&no_ts, &Info { ..no_ts }, &h0, &h0), Ok(false));
    assert_eq!(check(&i(7, 1460), &i(6, 1460), &h, &h), Err(Kept::Timestamps));
    assert_eq!(check(&i(7, 1460), &i(7, 1460), &h0, &h), Err(Kept::Timestamps));
    assert_eq!(check(&i(7, 1460), &i(7 | TCPI_OPT_USEC_TS, 1460), &h, &h), Err(Kept::Timestamps));
    let small = Handshake { mss: 1400, ..h };
    assert_eq!(check(&i(7, 1460), &i(7, 1460), &h, &small), Err(Kept::Mss));
}
