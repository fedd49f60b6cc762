//! The agent's boot self-check: what it reports about the block devices it is given, so a host
//! can verify a boot end to end (kernel, virtio-blk, agent) without any other channel.
//!
//! Kernel command-line options the agent understands (the kernel ignores them):
//! - `cocoon.write=vdX:LEN` writes [`pattern`]`(LEN)` at the start of that disk before it is read.
//! - `cocoon.panic=1` makes the agent exit instead of powering off, which panics the kernel.
//!
//! The agent prints one line per disk: `cocoon-agent: disk vda bytes=N fnv1a64=HEX`, and when
//! the VM has an entropy device, `cocoon-agent: hwrng bytes=N nonzero=M` for a sample of it,
//! and `cocoon-agent: user xcr0 0xN, kernel xsave yes|no`: the register state user space may
//! use against what the kernel saves across context switches.

/// FNV-1a, 64-bit: a checksum both sides compute the same way, with no SIMD and no dependency.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }

    /// Reads `input` to its end: `(bytes, checksum)`.
    pub fn of_reader(input: &mut impl std::io::Read) -> std::io::Result<(u64, u64)> {
        let mut hash = Fnv1a64::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                return Ok((total, hash.finish()));
            }
            hash.update(&buf[..n]);
            total += n as u64;
        }
    }
}

/// The bytes `cocoon.write` puts on a disk: every 8-byte word holds its own offset, so a
/// misplaced or partial write shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 8) as u64).to_le_bytes()[i % 8] ^ 0x5a)
        .collect()
}

/// How many bytes the agent reads from /dev/hwrng.
pub const HWRNG_SAMPLE: usize = 64;

/// The line the agent prints for its /dev/hwrng sample.
pub fn hwrng_line(bytes: usize, nonzero: usize) -> String {
    format!("cocoon-agent: hwrng bytes={bytes} nonzero={nonzero}")
}

/// The line the agent prints for a disk.
pub fn disk_line(name: &str, bytes: u64, checksum: u64) -> String {
    format!("cocoon-agent: disk {name} bytes={bytes} fnv1a64={checksum:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_values() {
        let mut h = Fnv1a64::default();
        assert_eq!(h.finish(), 0xcbf29ce484222325);
        h.update(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn pattern_encodes_offsets() {
        let p = pattern(24);
        assert_eq!(p[0..8], [0x5a; 8]);
        assert_eq!(p[8], 1 ^ 0x5a);
        assert_eq!(p[16], 2 ^ 0x5a);
    }
}

/// A deterministic byte stream (xorshift64) for transfer tests: both ends generate the same
/// bytes from a seed, so neither has to hold the whole transfer.
#[derive(Debug, Clone)]
pub struct PatternStream(u64);

impl PatternStream {
    pub fn new(seed: u64) -> Self {
        PatternStream(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }

    /// Checksum of the first `len` bytes of the stream for `seed`.
    pub fn checksum(seed: u64, len: usize) -> u64 {
        let mut stream = PatternStream::new(seed);
        let mut hash = Fnv1a64::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            stream.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            left -= n;
        }
        hash.finish()
    }
}
