//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit big-endian words.

use core::net::Ipv4Addr;

/// Ones' complement sum of `data` folded to 16 bits (not complemented).
///
/// Sums in the machine's byte order and swaps the folded result on little-endian machines:
/// the ones' complement sum is independent of byte order up to that final swap (RFC 1071
/// §2(B)). An odd trailing byte is padded with a zero low byte, as the RFC requires.
///
/// From 256 bytes the bulk goes 64 bytes at a time into 32-bit lanes ([`sum_blocks`]: AVX2
/// where the CPU has it); the rest, and short data, go 64-bit word by word with the carries
/// counted ([`words`]).
#[inline]
pub fn data(data: &[u8]) -> u16 {
    to_be(fold(unfolded(data, 0)))
}

/// [`data`] of an IPv4 pseudo-header (source, destination, zero, protocol, length) followed by
/// `data`: `combine(&[pseudo_header(..), data(..)])` with one fold instead of three (the
/// pseudo-header is summed in the machine's byte order with the data).
#[inline]
pub fn pseudo_and_data(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16, data: &[u8]) -> u16 {
    let [l0, l1] = length.to_be_bytes();
    let pseudo = u64::from(u32::from_ne_bytes(src.octets()))
        + u64::from(u32::from_ne_bytes(dst.octets()))
        + u64::from(u32::from_ne_bytes([0, protocol, l0, l1]));
    to_be(fold(unfolded(data, pseudo)))
}

/// The four bytes `b`, at an even offset of the summed data, as a term of the machine-order
/// sum: for headers summed from the values just written rather than read back from memory
/// (a load that spans several narrower stores still in flight cannot take their data from the
/// store buffer and waits for all of them: 41 % of `FrameRepr::emit`'s perf samples in S2).
#[inline(always)]
pub fn term(b: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(b))
}

/// [`data`] of `data` with the unfolded machine-order sum `acc` of other words (a sum of
/// [`term`]s: below 2^63) added.
#[inline]
pub fn with_terms(acc: u64, data: &[u8]) -> u16 {
    to_be(fold(unfolded(data, u64::from(fold(acc)))))
}

/// The machine-order sum, folded, as the big-endian number the checksum field holds.
#[inline]
fn to_be(sum: u16) -> u16 {
    if cfg!(target_endian = "little") {
        sum.swap_bytes()
    } else {
        sum
    }
}

/// `start` (below 2^35) plus the sum of `data` in the machine's byte order, unfolded.
#[inline]
fn unfolded(data: &[u8], start: u64) -> u64 {
    // Below this the lanes' set-up and fold-out (about 60 instructions) cost more than the
    // blocks save.
    const BLOCKS_FROM: usize = 256;
    let (acc, rest) = if data.len() >= BLOCKS_FROM { blocks(data) } else { (0, data) };
    let (sum, carried) = acc.overflowing_add(words(rest, start));
    // No overflow: when the add carried, sum < words(rest) < 2^64 - 1.
    sum + u64::from(carried)
}

/// Ones' complement sum of `data` in the machine's byte order, unfolded: 64-bit words added
/// with their carries counted aside (the compiler makes the pair an add and an add-with-carry:
/// about 3 instructions per 8 bytes, against 9 for two 32-bit words into a 64-bit total), the
/// 0-7 bytes after them as a 32-bit, a 16-bit and a zero-padded last word. Where a 16-bit word
/// sits in the wider words does not matter: 2^16 is 1 modulo 2^16 - 1.
#[inline]
fn words(data: &[u8], start: u64) -> u64 {
    let mut acc: u64 = 0;
    // `start` rides with the carries: at most 2^35 + len / 8 + three words under 2^32.
    let mut carries: u64 = start;
    let mut w8 = data.chunks_exact(8);
    for w in &mut w8 {
        let (s, c) = acc.overflowing_add(u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
        acc = s;
        carries += u64::from(c);
    }
    let mut rest = w8.remainder();
    // At most 2^35 + len / 8 carries and three words under 2^32: no overflow.
    let mut tail = carries;
    if let [a, b, c, d, more @ ..] = rest {
        tail += u64::from(u32::from_ne_bytes([*a, *b, *c, *d]));
        rest = more;
    }
    if let [a, b, more @ ..] = rest {
        tail += u64::from(u16::from_ne_bytes([*a, *b]));
        rest = more;
    }
    if let [a] = rest {
        tail += u64::from(u16::from_ne_bytes([*a, 0]));
    }
    let (s, c) = acc.overflowing_add(tail);
    // s + c cannot overflow: when the add carried, s < tail < 2^64 - 1.
    s + u64::from(c)
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

/// Folds a wide ones' complement accumulator into 16 bits, without branches: the two halves
/// added with the end-around carry, twice (64 to 32, 32 to 16 bits). The carry-in cannot
/// overflow: when an add carried, its sum is at most 2^n - 2. The compiler makes each step an
/// add and an add-with-carry (about half the instructions of four shift-mask-add steps).
#[inline]
pub fn fold(acc: u64) -> u16 {
    let (a, c) = (acc as u32).overflowing_add((acc >> 32) as u32);
    let a = a + u32::from(c);
    let (b, c) = (a as u16).overflowing_add((a >> 16) as u16);
    b + u16::from(c)
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

    /// The end-around-carry fold gives what adding the 16-bit halves until none carries out
    /// gives (the old four-step fold), for random and edge values.
    #[test]
    fn fold_matches_repeated_halving() {
        fn slow(mut a: u64) -> u16 {
            while a > 0xffff {
                a = (a & 0xffff) + (a >> 16);
            }
            a as u16
        }
        let mut next = super::super::xorshift(0x243f_6a88_85a3_08d3);
        let edges = [0, 1, 0xffff, 0x1_0000, 0x1_fffe, 0xffff_ffff, 0x1_0000_0000, u64::MAX, u64::MAX - 1, 1 << 63];
        for v in edges.into_iter().chain((0..100_000).map(|_| {
            let x = next();
            x >> (x % 48)
        })) {
            assert_eq!(fold(v), slow(v), "fold({v:#x})");
        }
    }

    /// The one-fold pseudo-header sum is the three-fold one, for every length up to 300 bytes
    /// (odd ones included) and random addresses, protocols and lengths.
    #[test]
    fn pseudo_and_data_is_combine_of_the_parts() {
        let mut next = super::super::xorshift(0x1357_9bdf_2468_ace0);
        let data: Vec<u8> = (0..300).map(|_| next() as u8).collect();
        for len in 0..=data.len() {
            for _ in 0..4 {
                let r = next();
                let (src, dst) = (Ipv4Addr::from((r >> 32) as u32), Ipv4Addr::from(r as u32));
                let (proto, length) = ((next() as u8), (next() as u16));
                let d = &data[..len];
                assert_eq!(
                    pseudo_and_data(src, dst, proto, length, d),
                    combine(&[pseudo_header(src, dst, proto, length), super::data(d)]),
                    "{src} {dst} {proto} {length} len {len}"
                );
            }
        }
        let (a, b) = (Ipv4Addr::new(255, 255, 255, 255), Ipv4Addr::new(255, 255, 255, 255));
        let ones = [0xffu8; 300];
        assert_eq!(
            pseudo_and_data(a, b, 255, 0xffff, &ones),
            combine(&[pseudo_header(a, b, 255, 0xffff), super::data(&ones)])
        );
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
    }

    #[test]
    fn matches_bytewise_reference_at_every_length() {
        let buf: Vec<u8> = (0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        // All ones: every add of the 64-bit words carries.
        let ones = [0xffu8; 300];
        for len in 0..300 {
            assert_eq!(data(&buf[..len]), reference(&buf[..len]), "len {len}");
            assert_eq!(data(&ones[..len]), reference(&ones[..len]), "ones, len {len}");
            // Unaligned starts.
            assert_eq!(data(&buf[3..3 + len]), reference(&buf[3..3 + len]), "offset 3, len {len}");
        }
        assert_eq!(data(&buf), reference(&buf));
        let ones = [0xffu8; 1499];
        assert_eq!(data(&ones), reference(&ones));
        for v in [0, 1, 0xffff, 0x1_0000, 0x1_0001, 0xffff_ffff, u64::MAX, u64::MAX - 1, 0x8000_0000_0000_ffff] {
            assert_eq!(u64::from(fold(v)) % 0xffff, v % 0xffff, "fold {v:#x}");
        }
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
