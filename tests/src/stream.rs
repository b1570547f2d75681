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
