//! Helpers shared by the integration tests: a seeded PRNG, message sizes, scatter/gather
//! splits and a pattern pool to draw message contents from. (Child processes: see
//! `machnet::testing::process`.)
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};

/// splitmix64: small, seedable, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    /// Log-uniform in `1..=max`.
    pub fn log_uniform(&mut self, max: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((max as f64).powf(u) as usize).clamp(1, max)
    }
}

/// Random bytes to slice message contents from (`len` + slack so any offset works).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Splits `0..len` into 1..=max_parts pieces (some possibly empty); returns the cut points.
pub fn cuts(r: &mut Rng, len: usize, max_parts: usize) -> Vec<usize> {
    let parts = r.range(1, max_parts);
    let mut c: Vec<usize> = (0..parts - 1).map(|_| r.range(0, len)).collect();
    c.push(0);
    c.push(len);
    c.sort_unstable();
    c
}

pub fn gather<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<IoSlice<'a>> {
    cuts.windows(2).map(|w| IoSlice::new(&data[w[0]..w[1]])).collect()
}

pub fn scatter<'a>(buf: &'a mut [u8], cuts: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let mut rest = buf;
    for w in cuts.windows(2) {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(w[1] - w[0]);
        rest = b;
        out.push(IoSliceMut::new(a));
    }
    out
}
