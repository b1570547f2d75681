//! Checked traffic on many connections at once, for tests that disturb lb
//! (kill its processes, upgrade it) while bytes flow: every connection
//! round-trips 64 bytes only it could have sent, through an echo backend,
//! over and over, and every failure is kept.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

/// 64 bytes that only connection `conn`'s round `round` sends.
pub fn pattern(conn: u32, round: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    let mut x = (u64::from(conn) << 32 | u64::from(round)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// Sends [`pattern`]`(conn, round)` through an echo and checks what comes back.
pub async fn round_trip(s: &mut TcpStream, conn: u32, round: u32) -> Result<(), String> {
    let want = pattern(conn, round);
    s.write_all(&want).await.map_err(|e| format!("write: {e}"))?;
    let mut got = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Err(_) => Err("no echo within 5 s".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) if got != want => Err("echo differs from what was sent".into()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Opens `n` connections to `addr`, each checked with a first round trip.
pub async fn open_checked(addr: SocketAddr, n: u32) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for i in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {i}: {e}"));
        round_trip(&mut s, i, 0).await.unwrap_or_else(|e| panic!("connection {i}, first round trip: {e}"));
        conns.push(s);
    }
    conns
}

/// Connections from [`open_checked`] round-tripping in `tasks` tasks until
/// [`Traffic::finish`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<(Vec<TcpStream>, Vec<String>)>>,
}

/// What [`Traffic::finish`] hands back.
pub struct Finished {
    /// The connections, in their original order.
    pub conns: Vec<TcpStream>,
    /// Every failed round trip, as "connection N round R: why".
    pub errors: Vec<String>,
}

impl Traffic {
    /// Starts the traffic; connection `i` keeps its id `i` in the patterns.
    pub fn start(mut conns: Vec<TcpStream>, tasks: usize) -> Traffic {
        let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let per = conns.len().div_ceil(tasks.max(1)).max(1);
        let mut handles = Vec::new();
        let mut first = 0u32;
        while !conns.is_empty() {
            let mut mine: Vec<TcpStream> = conns.drain(..per.min(conns.len())).collect();
            let (stop, rounds, base) = (stop.clone(), rounds.clone(), first);
            first += mine.len() as u32;
            handles.push(tokio::spawn(async move {
                let (mut errors, mut round) = (Vec::new(), 1);
                while !stop.load(Relaxed) {
                    for (k, s) in mine.iter_mut().enumerate() {
                        let id = base + k as u32;
                        if let Err(e) = round_trip(s, id, round).await {
                            errors.push(format!("connection {id} round {round}: {e}"));
                        }
                    }
                    rounds.fetch_add(1, Relaxed);
                    round += 1;
                }
                (mine, errors)
            }));
        }
        Traffic { stop, rounds, tasks: handles }
    }

    /// Task rounds completed so far (each task counts one per pass over its share).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Relaxed)
    }

    /// How many tasks run.
    pub fn tasks(&self) -> u64 {
        self.tasks.len() as u64
    }

    /// Stops after the current round and hands the connections back.
    pub async fn finish(self) -> Finished {
        self.stop.store(true, Relaxed);
        let mut out = Finished { conns: Vec::new(), errors: Vec::new() };
        for t in self.tasks {
            let (mine, errors) = t.await.expect("traffic task");
            out.conns.extend(mine);
            out.errors.extend(errors);
        }
        out
    }
}

/// Client `i` of `clients` sent 100 bytes of value `i` and its FIN to an
/// [`crate::backends::Backend::echo_after_eof`]: each gets its bytes back,
/// then EOF, within 3 s.
pub async fn expect_replies_after_fin(clients: &mut [TcpStream]) {
    for (i, s) in clients.iter_mut().enumerate() {
        let mut back = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut back)).await;
        assert!(matches!(r, Ok(Ok(_))), "client {i}: no reply and EOF after its FIN: {r:?}");
        assert_eq!(back, vec![i as u8; 100], "client {i}: reply differs");
    }
}
