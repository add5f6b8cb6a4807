//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit big-endian words.

use core::net::Ipv4Addr;

/// Ones' complement sum of `data` folded to 16 bits (not complemented).
///
/// Sums in the machine's byte order and swaps the folded result on little-endian machines:
/// the ones' complement sum is independent of byte order up to that final swap (RFC 1071
/// §2(B)). An odd trailing byte is padded with a zero low byte, as the RFC requires.
///
/// From 256 bytes the bulk goes 64 bytes at a time into 32-bit lanes ([`sum_blocks`]: AVX2
/// where the CPU has it); the rest, and short data, go 32-bit word by word into a 64-bit
/// accumulator.
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
    let bulk = data.len() / 64 * 64;
    (sum_blocks(&data[..bulk]), &data[bulk..])
}

/// [`lanes`] compiled for the best vector unit the CPU has, chosen once at run time (with the
/// `std` feature; without it, what the build's target features allow). With AVX2 the block
/// takes about 8 instructions (four zero-extending loads of eight words, four adds), against
/// 27 with SSE2 (callgrind, S4 at 1 KiB: docs/performance.md).
#[multiversion::multiversion(targets("x86_64+avx2"))]
fn sum_blocks(data: &[u8]) -> u64 {
    lanes(data)
}

/// Sum of `data` (a whole number of 64-byte blocks) in the machine's byte order, unfolded: the
/// 32 16-bit words of a block go into 32 32-bit lanes (the compiler vectorises the block), no
/// lane can carry out before 65,536 blocks (4 MiB), so the lanes are added into the 64-bit
/// total every 32,768 blocks (2 MiB). Inlined into each of [`sum_blocks`]'s clones, so it is
/// compiled once per instruction set.
#[inline(always)]
fn lanes(data: &[u8]) -> u64 {
    /// Blocks between folds of the lanes (65,535 at most).
    const FOLD_EVERY: usize = 32_768;
    let mut acc: u64 = 0;
    for part in data.chunks(64 * FOLD_EVERY) {
        let mut lanes = [0u32; 32];
        for b in part.chunks_exact(64) {
            for i in 0..32 {
                lanes[i] += u32::from(u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]));
            }
        }
        for l in lanes {
            acc += u64::from(l);
        }
    }
    acc
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

    /// The dispatched block sum (AVX2 on CPUs that have it) and the portable kernel (what CPUs
    /// without it run) agree, with each other and with the reference, so the path this machine
    /// does not take is checked too.
    #[test]
    fn the_vector_and_the_portable_block_sums_agree() {
        let swap = |s: u16| if cfg!(target_endian = "little") { s.swap_bytes() } else { s };
        let big: Vec<u8> = (0..(4u32 << 20) + 256).map(|i| (i.wrapping_mul(2_246_822_519) >> 7) as u8).collect();
        let all_ones = vec![0xffu8; (4 << 20) + 256];
        for blocks in [1usize, 2, 3, 4, 5, 16, 17, 1000, 32_767, 32_768, 32_769, 65_536, 65_538] {
            let len = blocks * 64;
            for d in [&big[..len], &all_ones[..len], &big[64..64 + len]] {
                let portable = fold(lanes(d));
                assert_eq!(fold(sum_blocks(d)), portable, "{blocks} blocks");
                assert_eq!(swap(portable), reference(d), "{blocks} blocks");
            }
        }
    }
}
