//! SYN cookies: a server flow's ISN is a keyed MAC of the connection, so the client's final
//! ACK proves the handshake even when the half-open flow is gone.
//!
//! Half-open flows have a budget ([`crate::Config::max_half_open`]); a SYN flood evicts the
//! oldest. A real client whose final ACK comes later than a budget's worth of forged SYNs
//! (1024 at 20,000 SYNs/s: 51 ms, less than a CPU-starved host's scheduling delay) would find
//! its half-open flow evicted and get a RST. With cookies the ACK rebuilds the flow instead:
//! its `ackno − 1` must be the ISN this endpoint would have chosen for that 4-tuple, that
//! client ISN (`seqno − 1`) and a recent epoch, which only a host that received our SYN-ACK
//! knows. The ISN is
//!
//! ```text
//! bits 31..3: SipHash-2-4(key; epoch, peer ip, ports, client ISN, local ip, options)  bits 63..35
//! bit 2:      the epoch's parity (epoch = now / 2^31 ns, about 2.1 s)
//! bit 1:      the SYN had no timestamp (an original Machnet peer: legacy)
//! bit 0:      ACKs in DATA were negotiated
//! ```
//!
//! so a cookie is accepted for 2.1 to 4.3 s, and the two options the SYN negotiated come back
//! with it (authenticated: they are part of the MAC). The key is drawn from the endpoint's seed
//! (random in the daemon). As for TCP's cookies (RFC 4987 §3.6), what a SYN carried beyond
//! that is not recovered: here nothing else is needed.

/// Epoch length: 2^31 ns.
const EPOCH_SHIFT: u32 = 31;

/// The key and the arithmetic of cookies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cookies {
    k0: u64,
    k1: u64,
}

/// What a cookie carries besides its proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CookieOpts {
    pub legacy: bool,
    pub piggy: bool,
}

impl Cookies {
    /// A key drawn from `seed` (splitmix64).
    pub(crate) fn new(seed: u64) -> Self {
        let mut s = seed ^ 0x636f_6f6b_6965_2121;
        let mut next = || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Cookies { k0: next(), k1: next() }
    }

    fn mac(&self, epoch: u64, conn: Conn, opts: CookieOpts) -> u32 {
        let [w1, w2] = conn.words();
        let w3 = u64::from(opts.legacy) | (u64::from(opts.piggy) << 1);
        (siphash24(self.k0, self.k1, &[epoch, w1, w2, w3]) >> 35) as u32
    }

    /// The ISN of a server flow for `conn` accepted at `now_ns` with `opts`.
    pub(crate) fn isn(&self, now_ns: u64, conn: Conn, opts: CookieOpts) -> u32 {
        let epoch = now_ns >> EPOCH_SHIFT;
        (self.mac(epoch, conn, opts) << 3)
            | (((epoch & 1) as u32) << 2)
            | (u32::from(opts.legacy) << 1)
            | u32::from(opts.piggy)
    }

    /// Where `conn` is recorded among the evicted half-open flows (a bit of an
    /// [`Evicted`] map).
    pub(crate) fn slot(&self, conn: Conn) -> usize {
        (siphash24(self.k1, self.k0, &conn.words()) % EVICTED_BITS as u64) as usize
    }

    /// Whether `isn` is a cookie this endpoint issued for `conn` in this epoch or the last one;
    /// the options it carries if so.
    pub(crate) fn check(&self, now_ns: u64, conn: Conn, isn: u32) -> Option<CookieOpts> {
        let cur = now_ns >> EPOCH_SHIFT;
        let epoch = if (cur & 1) as u32 == (isn >> 2) & 1 { cur } else { cur.checked_sub(1)? };
        let opts = CookieOpts { legacy: isn & 2 != 0, piggy: isn & 1 != 0 };
        (self.mac(epoch, conn, opts) == isn >> 3).then_some(opts)
    }
}

/// Bits of each epoch's map of evicted half-open flows.
const EVICTED_BITS: usize = 1 << 16;

/// Which half-open flows a flood evicted in this epoch and the last (a bit per connection,
/// hashed): a cookie is accepted only for those. Without this gate any pure ACK whose
/// connection has no flow could rebuild one within the cookie's lifetime, for example a
/// client's ACK for a flow the server's application had just closed (its RST lost): the flow
/// would come back and deliver what the client sent after the close. (Linux accepts cookies
/// only after a recent SYN-queue overflow for the same reason.) 16 KiB per endpoint; under a
/// flood of more than about 65,000 evictions an epoch the maps fill and every cookie passes,
/// as in Linux during an overflow.
#[derive(Debug, Clone)]
pub(crate) struct Evicted {
    maps: [alloc::vec::Vec<u64>; 2],
    epochs: [u64; 2],
}

impl Evicted {
    pub(crate) fn new() -> Self {
        Evicted { maps: [alloc::vec![0; EVICTED_BITS / 64], alloc::vec![0; EVICTED_BITS / 64]], epochs: [u64::MAX; 2] }
    }

    /// Records the eviction of the half-open flow at `slot` at `now_ns`.
    pub(crate) fn record(&mut self, now_ns: u64, slot: usize) {
        let e = now_ns >> EPOCH_SHIFT;
        let m = (e & 1) as usize;
        if self.epochs[m] != e {
            self.maps[m].fill(0);
            self.epochs[m] = e;
        }
        self.maps[m][slot / 64] |= 1 << (slot % 64);
    }

    /// Whether a half-open flow at `slot` was evicted in this epoch or the last; forgets it
    /// (a cookie is good for one flow).
    pub(crate) fn take(&mut self, now_ns: u64, slot: usize) -> bool {
        let cur = now_ns >> EPOCH_SHIFT;
        let mut found = false;
        for m in 0..2 {
            let fresh = self.epochs[m] == cur || self.epochs[m].wrapping_add(1) == cur;
            let bit = 1u64 << (slot % 64);
            if fresh && self.maps[m][slot / 64] & bit != 0 {
                self.maps[m][slot / 64] &= !bit;
                found = true;
            }
        }
        found
    }
}

/// The connection a cookie is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conn {
    pub peer_ip: u32,
    pub peer_port: u16,
    pub local_ip: u32,
    pub local_port: u16,
    /// The client's ISN (its SYN's seqno).
    pub client_isn: u32,
}

impl Conn {
    /// The connection as two words for the hash.
    fn words(self) -> [u64; 2] {
        [
            (u64::from(self.peer_ip) << 32) | (u64::from(self.peer_port) << 16) | u64::from(self.local_port),
            (u64::from(self.client_isn) << 32) | u64::from(self.local_ip),
        ]
    }
}

/// SipHash-2-4 (Aumasson and Bernstein) of whole 64-bit words, little-endian as the reference
/// reads bytes; the length byte counts the words' bytes.
fn siphash24(k0: u64, k1: u64, words: &[u64]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let absorb = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    };
    for &m in words {
        absorb(&mut v, m);
    }
    absorb(&mut v, ((words.len() as u64 * 8) & 0xff) << 56);
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // The reference implementation's vectors (key 00 01 .. 0f, message 00 01 .. n-1) for
        // 8 and 16 bytes.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let m0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let m1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(siphash24(k0, k1, &[]), u64::from_le_bytes([0x31, 0x0e, 0x0e, 0xdd, 0x47, 0xdb, 0x6f, 0x72]));
        assert_eq!(siphash24(k0, k1, &[m0]), u64::from_le_bytes([0x62, 0x24, 0x93, 0x9a, 0x79, 0xf5, 0xf5, 0x93]));
        assert_eq!(siphash24(k0, k1, &[m0, m1]), u64::from_le_bytes([0xdb, 0x9b, 0xc2, 0x57, 0x7f, 0xcc, 0x2a, 0x3f]));
    }

    fn conn() -> Conn {
        Conn { peer_ip: 0xc612_0001, peer_port: 40_000, local_ip: 0xc612_0002, local_port: 888, client_isn: 77 }
    }

    #[test]
    fn a_cookie_checks_for_its_connection_and_two_epochs_only() {
        let c = Cookies::new(5);
        let opts = CookieOpts { legacy: false, piggy: true };
        let t = 10u64 << EPOCH_SHIFT;
        let isn = c.isn(t, conn(), opts);
        assert_eq!(c.check(t, conn(), isn), Some(opts));
        assert_eq!(c.check(t + (1 << EPOCH_SHIFT), conn(), isn), Some(opts), "the next epoch");
        assert_eq!(c.check(t + (2 << EPOCH_SHIFT), conn(), isn), None, "two epochs on");
        // Any other connection, client ISN, option or key: refused.
        for other in [
            Conn { peer_port: 40_001, ..conn() },
            Conn { peer_ip: 0xc612_0003, ..conn() },
            Conn { local_port: 889, ..conn() },
            Conn { client_isn: 78, ..conn() },
        ] {
            assert_eq!(c.check(t, other, isn), None, "{other:?}");
        }
        assert_eq!(c.check(t, conn(), isn ^ 1), None, "an option flipped");
        assert_eq!(c.check(t, conn(), isn ^ 8), None, "a MAC bit flipped");
        assert_eq!(Cookies::new(6).check(t, conn(), isn), None, "another key");
        // The map of evictions: found in this epoch and the next, once; not two epochs on.
        let mut ev = Evicted::new();
        let slot = c.slot(conn());
        assert!(!ev.take(t, slot));
        ev.record(t, slot);
        assert!(ev.take(t + (1 << EPOCH_SHIFT), slot));
        assert!(!ev.take(t + (1 << EPOCH_SHIFT), slot), "taken once");
        ev.record(t, slot);
        ev.record(t + (1 << EPOCH_SHIFT), c.slot(Conn { client_isn: 9, ..conn() }));
        assert!(!ev.take(t + (2 << EPOCH_SHIFT), slot), "two epochs on");
        // Of a million guesses, about 2^20 / 2^29 pass by chance per epoch tried.
        let passed = (0..1_000_000u32).filter(|g| c.check(t, conn(), g.wrapping_mul(2_654_435_761)).is_some()).count();
        assert!(passed <= 20, "{passed} guesses passed");
    }
}
