//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit big-endian words.

use core::net::Ipv4Addr;

/// Ones' complement sum of `data` folded to 16 bits (not complemented).
///
/// Sums in the machine's byte order and swaps the folded result on little-endian machines:
/// the ones' complement sum is independent of byte order up to that final swap (RFC 1071
/// §2(B)). An odd trailing byte is padded with a zero low byte, as the RFC requires.
///
/// From 256 bytes the bulk goes 64 bytes at a time into sixteen 32-bit lanes, each word's two 16-bit
/// halves into separate lanes (`lo`, `hi`): no lane can carry out before 65,536 blocks
/// (4 MiB), so the lanes are folded into the 64-bit total every 32,768 blocks (2 MiB). The compiler
/// turns the block into vector and, shift and add instructions: 27 instructions per 64 bytes
/// with SSE2, against 36 for 32-bit words widened into a 64-bit accumulator (the loop for
/// the rest and for short data; callgrind, S4 at 1 KiB: docs/performance.md).
#[inline]
pub fn data(data: &[u8]) -> u16 {
    // Below this the lanes' set-up and fold-out (about 60 instructions) cost more than the
    // blocks save.
    const BLOCKS_FROM: usize = 256;
    let (mut acc, rest) = if data.len() >= BLOCKS_FROM { blocks(data) } else { (0, data) };
    let mut words = rest.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let tail = match *words.remainder() {
        [a] => [a, 0, 0, 0],
        [a, b] => [a, b, 0, 0],
        [a, b, c] => [a, b, c, 0],
        _ => [0; 4],
    };
    acc += u64::from(u32::from_ne_bytes(tail));
    let sum = fold(acc);
    if cfg!(target_endian = "little") {
        sum.swap_bytes()
    } else {
        sum
    }
}

/// The 64-byte blocks of `data` summed (as [`data`] explains), and what is left after them.
#[inline]
fn blocks(data: &[u8]) -> (u64, &[u8]) {
    /// Blocks between folds of the lanes (65,535 at most).
    const FOLD_EVERY: usize = 32_768;
    let bulk = data.len() / 64 * 64;
    let mut acc: u64 = 0;
    for part in data[..bulk].chunks(64 * FOLD_EVERY) {
        let mut lo = [0u32; 16];
        let mut hi = [0u32; 16];
        for b in part.chunks_exact(64) {
            for i in 0..16 {
                let w = u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
                lo[i] += w & 0xffff;
                hi[i] += w >> 16;
            }
        }
        for i in 0..16 {
            acc += u64::from(lo[i]) + (u64::from(hi[i]) << 16);
        }
    }
    (acc, &data[bulk..])
}

/// Folds a wide ones' complement accumulator into 16 bits.
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Ones' complement sum of several partial sums.
#[inline]
pub fn combine(parts: &[u16]) -> u16 {
    fold(parts.iter().map(|&p| u64::from(p)).sum())
}

/// Partial sum of the IPv4 pseudo-header (source, destination, zero, protocol, length).
#[inline]
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    let s = u32::from(src);
    let d = u32::from(dst);
    let acc = u64::from(s >> 16)
        + u64::from(s & 0xffff)
        + u64::from(d >> 16)
        + u64::from(d & 0xffff)
        + u64::from(protocol)
        + u64::from(length);
    fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for (i, b) in data.iter().enumerate() {
            acc += if i % 2 == 0 { u64::from(*b) << 8 } else { u64::from(*b) };
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    #[test]
    fn matches_bytewise_reference_at_every_length() {
        let buf: Vec<u8> = (0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in 0..300 {
            assert_eq!(data(&buf[..len]), reference(&buf[..len]), "len {len}");
        }
        assert_eq!(data(&buf), reference(&buf));
        let ones = [0xffu8; 1499];
        assert_eq!(data(&ones), reference(&ones));
        // Past the point where the 32-bit lanes are folded (every 2 MiB): all ones, the
        // worst case for a lane's carry, and pseudo-random bytes, at lengths around it.
        let big: Vec<u8> = (0..(4u32 << 20) + 70).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let all_ones = vec![0xffu8; (4 << 20) + 70];
        for len in [(2 << 20) - 1, 2 << 20, (2 << 20) + 63, 4 << 20, (4 << 20) + 69] {
            assert_eq!(data(&big[..len]), reference(&big[..len]), "len {len}");
            assert_eq!(data(&all_ones[..len]), reference(&all_ones[..len]), "ones, len {len}");
        }
    }
}
