//! Deterministic byte streams: a seed names the whole stream, so a receiver
//! can check every byte without the sender's copy.

/// xorshift64* bytes, produced in order across any chunking.
#[derive(Clone, Debug)]
pub struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, word: [0; 8], used: 8 }
    }

    fn next_word(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// Checks that `buf` equals the next bytes of the stream.
    pub fn check(&mut self, buf: &[u8], scratch: &mut Vec<u8>) -> bool {
        scratch.resize(buf.len(), 0);
        self.fill(scratch);
        scratch[..] == buf[..]
    }
}

/// A small PRNG for test parameters (sizes, seeds).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A size in `0..=max`, log-uniform so small and large sizes both appear.
    pub fn size(&mut self, max: u64) -> u64 {
        let bits = 64 - max.leading_zeros() as u64;
        let b = self.next_u64() % (bits + 1);
        if b == 0 { 0 } else { (self.next_u64() % (1 << b)).min(max) }
    }
}

/// Reads `s` to its end: the bytes, and whether the end was a reset
/// (`false`: EOF). `Err` when nothing arrives for 20 s, or another error.
pub async fn read_to_end(s: &mut tokio::net::TcpStream) -> Result<(Vec<u8>, bool), String> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf)).await {
            Err(_) => return Err(format!("nothing more after {} bytes within 20 s", got.len())),
            Ok(Ok(0)) => return Ok((got, false)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok((got, true)),
            Ok(Err(e)) => return Err(format!("after {} bytes: {e}", got.len())),
        }
    }
}

/// `got` is exactly the first `size` bytes of stream `seed`.
pub fn intact(got: &[u8], seed: u64, size: usize) -> bool {
    let mut want = vec![0u8; size];
    Stream::new(seed).fill(&mut want);
    got == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0u8; 1000];
        Stream::new(7).fill(&mut whole);
        let mut s = Stream::new(7);
        let mut scratch = Vec::new();
        let mut off = 0;
        for n in [1, 3, 8, 13, 200, 775] {
            assert!(s.check(&whole[off..off + n], &mut scratch), "chunk at {off}");
            off += n;
        }
        let mut other = vec![0u8; 16];
        Stream::new(8).fill(&mut other);
        assert_ne!(other[..], whole[..16]);
    }
}
