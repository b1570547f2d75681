//! The packet plane: once lb has made both TCP connections, its TC program
//! rewrites every later packet of one connection into the other, and lb
//! closes both of its sockets silently. A connection is then two
//! [`Flow`]s in `LB_FLOWS`, one per direction, keyed by the packet as it
//! arrives ([`FlowKey`]).

/// A packet as it arrives at lb: the client's to lb's frontend address, or
/// the server's to lb's source address. Addresses are IPv6 bytes (IPv4 as
/// `::ffff:a.b.c.d`), network order; ports network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// One direction of a joined connection: what a packet matching its
/// [`FlowKey`] becomes, and what the program counts of them. Userspace
/// writes the first part; the program writes the counters.
///
/// Sequence spaces: a byte at offset `k` of the client's stream has
/// sequence number `x` toward lb and `x + seq_add` toward the server (both
/// connections carry the same bytes after the join); the acknowledgment
/// and SACK edges, which count the other direction's bytes, move by
/// `ack_add`. All additions wrap (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    /// The rewritten packet's source and destination, as [`FlowKey`].
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    /// Added to the sequence number.
    pub seq_add: u32,
    /// Added to the acknowledgment number and to every SACK block edge.
    pub ack_add: u32,
    /// Added to TSval (timestamps on both connections).
    pub tsval_add: u32,
    /// Added to TSecr.
    pub tsecr_add: u32,
    /// The window of these packets is in units of `1 << win_in` bytes; the
    /// receiver reads it in units of `1 << win_out`. Equal: untouched.
    pub win_in: u8,
    pub win_out: u8,
    /// [`JOINED`] (0: an entry being written).
    pub state: u8,
    /// 1: this direction carries the client's packets.
    pub client: u8,
    /// What the program saw go this way, each 0 or 1 (one byte each, set
    /// and never cleared: no read-modify-write races between CPUs): a FIN,
    /// a reset, and whether the end was reported (both FINs, or a reset;
    /// the entries stay a while for the last ACKs and retransmissions).
    pub fin: u8,
    pub rst: u8,
    pub ended: u8,
    /// 1 once the program found the other direction's entry of the same
    /// connection: it rewrites a direction only from then on (see
    /// `lb_packet`), and looks no more once it has.
    pub paired: u8,
    /// The worker slot whose holder is told of the end.
    pub slot: u16,
    /// Indexes of the frontend and the backend (config order), for a
    /// holder or worker that starts later and counts the connection.
    pub frontend: u16,
    pub backend: u16,
    pub _pad1: u16,
    /// Where the rewritten packet leaves: 0 back to this host's stack
    /// (loopback), else the interface it is sent out of.
    pub ifindex: u32,
    /// The highest acknowledgment number seen this way, as sent (before
    /// the rewrite): how far this sender has taken the other's stream.
    pub ack_seen: u32,
    /// 2 once the program held back a reset of this sender that was not
    /// yet exact (see the program).
    pub deferred: u32,
    /// The connection's id: the client socket's cookie, in both directions.
    pub id: u64,
    /// CLOCK_MONOTONIC ns of the join.
    pub start_ns: u64,
    /// Payload bytes of the packets rewritten.
    pub bytes: u64,
    pub packets: u64,
    /// `bpf_ktime_get_coarse_ns()` of the last packet (the join, before).
    pub last_ns: u64,
    /// The last TSval seen in this direction, as sent.
    pub ts_last: u32,
    /// With `deferred`: the highest sequence number of the resets held
    /// back, rewritten (where the receiver's stream ends).
    pub rst_seq: u32,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 128);

/// Value of `LB_FLOW_CTL`, keyed by the connection's id: what lb tells the
/// program about a joined connection after the join. lb writes it whole
/// and the program only reads it, so neither overwrites what the other
/// wrote (the program updates the flows in place; a write of lb's replaces
/// an entry whole).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowCtl {
    /// The client's FIN, the server's FIN: delivered by lb's sockets
    /// (they took it before the join), not by the program.
    pub fin: [u8; 2],
    /// 1 while lb's sockets still deliver what they took before the join:
    /// the program then holds back every reset (it would overtake them).
    pub custody: u8,
    pub _pad: u8,
    /// What the client and the server had acknowledged of lb's sockets
    /// (their `snd_una`) when the custody ended: acknowledgments that
    /// reached the sockets, not the program.
    pub acked: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<FlowCtl>() == 12);

/// [`Flow::state`]: every packet is rewritten into the other connection.
pub const JOINED: u8 = 1;
/// [`Flow::state`] of an entry keyed by a packet lb's own socket sends to
/// a live peer after the other peer reset: the program turns that packet
/// (lb's socket's abortive reset) into a reset at `seq_add`, where the
/// peer's stream from the dead side ends, and reports the end.
pub const TURN: u8 = 2;

/// How a joined connection ended ([`PacketEnd::how`]).
pub const END_FIN: u32 = 1;
pub const END_RST: u32 = 2;

/// What the program tells the holder of a slot when a joined connection
/// ends (its ring in `LB_PACKET_ENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PacketEnd {
    pub id: u64,
    /// Payload bytes client to server, server to client.
    pub bytes: [u64; 2],
    pub packets: [u64; 2],
    pub start_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` of the end.
    pub end_ns: u64,
    /// [`END_FIN`] or [`END_RST`].
    pub how: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PacketEnd>() == 64);

/// What `lb_setup` recorded of a socket's handshake when it completed
/// (`LB_HANDSHAKE`, keyed by the socket's cookie), for the packet plane:
/// where each sequence space starts, which fixes the join's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Handshake {
    /// The socket's first sequence number after its SYN (its ISN + 1).
    pub snd_base: u32,
    /// The peer's first sequence number after its SYN.
    pub rcv_base: u32,
    /// The peer's TSval in the packet that completed the handshake (0:
    /// no timestamps).
    pub peer_tsval: u32,
    /// The MSS the peer announced (0: not known).
    pub mss: u32,
    /// When `lb_setup` read that packet: the kernel's TCP clock
    /// (CLOCK_MONOTONIC) in milliseconds, which every socket's timestamps
    /// follow with an offset of its own. The peer sent its TSval then or a
    /// little before, so `peer_tsval - at_ms` is at most the peer's offset.
    pub at_ms: u32,
}
const _: () = assert!(core::mem::size_of::<Handshake>() == 20);

/// What the TC program counts, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PacketCounters {
    /// Packets rewritten from one connection into the other.
    pub rewritten: u64,
    /// Payload bytes in them.
    pub bytes: u64,
    /// SACK blocks translated.
    pub sack_blocks: u64,
    /// FINs and resets held back while lb's sockets were still delivering.
    pub deferred: u64,
    /// Joined connections that ended (reported to a holder).
    pub ended: u64,
    /// Ends that found no ring (their holder reads the flow instead).
    pub ends_lost: u64,
    /// SYNs on the tuple of a flow: the flow was removed and the SYN
    /// passed (a new connection reusing an ended one's addresses).
    pub syn_reuse: u64,
    /// Resets of lb's own sockets moved to where a dead side's stream
    /// ends, for its live peer ([`TURN`]).
    pub turned: u64,
    /// Packets rewritten and sent out of an interface toward their peer
    /// (not loopback).
    pub redirected: u64,
    /// ICMP errors about a joined connection translated for its peer.
    pub icmp: u64,
}
const _: () = assert!(core::mem::size_of::<PacketCounters>() == 80);

impl PacketCounters {
    /// Field-wise sum, for folding per-CPU slots.
    pub fn add(&self, o: &Self) -> Self {
        Self {
            rewritten: self.rewritten + o.rewritten,
            bytes: self.bytes + o.bytes,
            sack_blocks: self.sack_blocks + o.sack_blocks,
            deferred: self.deferred + o.deferred,
            ended: self.ended + o.ended,
            ends_lost: self.ends_lost + o.ends_lost,
            syn_reuse: self.syn_reuse + o.syn_reuse,
            turned: self.turned + o.turned,
            redirected: self.redirected + o.redirected,
            icmp: self.icmp + o.icmp,
        }
    }
}

impl Flow {
    /// The key of the packets that come back: from where this direction's
    /// packets go, to where they seem to come from.
    pub fn reverse_key(&self) -> FlowKey {
        FlowKey { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, _pad: 0 }
    }
}

#[cfg(feature = "user")]
crate::pod!(FlowKey, Flow, PacketEnd, PacketCounters, Handshake, FlowCtl);
