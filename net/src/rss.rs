//! Receive-side scaling: the Toeplitz hash, RETA lookup, and the "RSS--" source-port search.
//!
//! A NIC with RSS hashes each received packet's 4-tuple with the Toeplitz function under its
//! secret key, and the redirection table (RETA) maps the hash to a receive queue. Cloud vNICs
//! offer no flow-steering rules, so Machnet steers by choosing the *client* source port: it picks
//! the lowest free port `p` such that the reply the peer will send (remote → local, destination
//! port `p`) hashes to the queue of the shard that owns the flow (spec §5.3). Like the original,
//! the byte-swapped hash must map to the same queue too, which guards against drivers that
//! report or apply the hash in the other byte order.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

/// The 40-byte key of Microsoft's RSS verification suite, also many drivers' default.
pub const MICROSOFT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0, 0xd0, 0xca, 0x2b,
    0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac,
    0x01, 0xfa,
];

/// Lowest port handed out to client flows.
pub const CLIENT_PORT_MIN: u16 = 1024;

/// The Toeplitz hash of `input` under `key`, bit by bit (the reference definition): for every
/// set input bit `b` (b = 0 is the most significant bit of the first byte), XOR in the 32-bit
/// window of the key that starts at key bit `b`. Key bits past the end count as zero.
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let key_bit = |i: usize| -> u32 { key.get(i / 8).map_or(0, |b| u32::from(b >> (7 - i % 8)) & 1) };
    let mut window: u32 = (0..32).fold(0, |w, i| (w << 1) | key_bit(i));
    let mut hash = 0u32;
    for (i, byte) in input.iter().enumerate() {
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | key_bit(i * 8 + bit + 32);
        }
    }
    hash
}

/// The 12-byte IPv4/UDP hash input, in the order the NIC sees a packet from `src` to `dst`.
pub fn ipv4_tuple_input(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&src.octets());
    b[4..8].copy_from_slice(&dst.octets());
    b[8..10].copy_from_slice(&src_port.to_be_bytes());
    b[10..12].copy_from_slice(&dst_port.to_be_bytes());
    b
}

/// Why RSS state could not be built or a port not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RssError {
    /// The RETA is empty or its length is not a power of two.
    BadReta,
    /// The key is shorter than the 16 bytes a 12-byte IPv4/UDP input needs.
    ShortKey,
    /// No free port in [1024, 65535] satisfies the steering predicate.
    NoPortAvailable,
}

impl fmt::Display for RssError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RssError::BadReta => "RSS redirection table must be non-empty with a power-of-two length",
            RssError::ShortKey => "RSS key must be at least 16 bytes",
            RssError::NoPortAvailable => "no free source port steers replies to this queue",
        })
    }
}

impl core::error::Error for RssError {}

/// A device's RSS state (key and RETA) with a per-byte lookup table that makes hashing a
/// 12-byte IPv4/UDP tuple twelve table lookups.
#[derive(Clone)]
pub struct Rss {
    reta: Vec<u16>,
    mask: u32,
    /// `table[i][v]`: contribution of byte value `v` at input position `i`.
    table: Box<[[u32; 256]; 12]>,
}

impl fmt::Debug for Rss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rss").field("reta_len", &self.reta.len()).finish_non_exhaustive()
    }
}

impl Rss {
    /// Builds the state from a key (≥ 16 bytes) and a RETA whose length is a power of two.
    pub fn new(key: &[u8], reta: &[u16]) -> Result<Self, RssError> {
        if key.len() < 16 {
            return Err(RssError::ShortKey);
        }
        if reta.is_empty() || !reta.len().is_power_of_two() {
            return Err(RssError::BadReta);
        }
        let mut table = Box::new([[0u32; 256]; 12]);
        for (pos, row) in table.iter_mut().enumerate() {
            // Contribution of each single bit at this byte position, then XOR-combine.
            let mut bit_contrib = [0u32; 8];
            for (bit, c) in bit_contrib.iter_mut().enumerate() {
                let mut input = [0u8; 12];
                input[pos] = 0x80 >> bit;
                *c = toeplitz(key, &input);
            }
            for (v, slot) in row.iter_mut().enumerate() {
                *slot = (0..8).filter(|b| v & (0x80 >> b) != 0).fold(0, |h, b| h ^ bit_contrib[b]);
            }
        }
        Ok(Rss { reta: reta.to_vec(), mask: (reta.len() - 1) as u32, table })
    }

    /// A round-robin RETA of `len` entries over `queues` queues (how the original programs it).
    pub fn round_robin_reta(len: usize, queues: u16) -> Vec<u16> {
        (0..len).map(|i| (i % usize::from(queues.max(1))) as u16).collect()
    }

    /// The RETA.
    pub fn reta(&self) -> &[u16] {
        &self.reta
    }

    /// Toeplitz hash of a 12-byte input, by table.
    #[inline]
    pub fn hash(&self, input: &[u8; 12]) -> u32 {
        let mut h = 0;
        for (i, b) in input.iter().enumerate() {
            h ^= self.table[i][usize::from(*b)];
        }
        h
    }

    /// Queue the RETA maps a hash to.
    #[inline]
    pub fn queue_of(&self, hash: u32) -> u16 {
        self.reta[(hash & self.mask) as usize]
    }

    /// True if a packet from `remote` to `local` with these ports lands on `queue`, in both byte
    /// orders of the hash.
    #[inline]
    pub fn steers_to(
        &self,
        queue: u16,
        remote_ip: Ipv4Addr,
        local_ip: Ipv4Addr,
        remote_port: u16,
        local_port: u16,
    ) -> bool {
        let h = self.hash(&ipv4_tuple_input(remote_ip, local_ip, remote_port, local_port));
        self.queue_of(h) == queue && self.queue_of(h.swap_bytes()) == queue
    }
}

/// Which of the 65,536 ports of one local IP are in use (listeners and client flows).
#[derive(Clone)]
pub struct PortBitmap {
    /// Bit set = port in use.
    used: Box<[u64; 1024]>,
}

impl Default for PortBitmap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PortBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n: u32 = self.used.iter().map(|w| w.count_ones()).sum();
        write!(f, "PortBitmap({n} in use)")
    }
}

impl PortBitmap {
    /// All ports free.
    pub fn new() -> Self {
        PortBitmap { used: Box::new([0; 1024]) }
    }
    /// True if `port` is in use.
    #[inline]
    pub fn is_used(&self, port: u16) -> bool {
        self.used[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }
    /// Marks `port` in use; false if it already was.
    #[inline]
    pub fn take(&mut self, port: u16) -> bool {
        let (w, m) = (usize::from(port) / 64, 1u64 << (port % 64));
        let was_free = self.used[w] & m == 0;
        self.used[w] |= m;
        was_free
    }
    /// Marks `port` free; false if it already was.
    #[inline]
    pub fn release(&mut self, port: u16) -> bool {
        let (w, m) = (usize::from(port) / 64, 1u64 << (port % 64));
        let was_used = self.used[w] & m != 0;
        self.used[w] &= !m;
        was_used
    }
    /// Number of ports in use.
    pub fn count_used(&self) -> usize {
        self.used.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The lowest free port in [1024, 65535] that satisfies `pred`, scanning a word of 64 ports
    /// at a time and skipping used ones.
    pub fn lowest_free_client_port(&self, mut pred: impl FnMut(u16) -> bool) -> Option<u16> {
        let first_word = usize::from(CLIENT_PORT_MIN) / 64;
        for (wi, w) in self.used.iter().enumerate().skip(first_word) {
            let mut free = !*w;
            while free != 0 {
                let bit = free.trailing_zeros() as usize;
                free &= free - 1;
                let port = (wi * 64 + bit) as u16;
                if pred(port) {
                    return Some(port);
                }
            }
        }
        None
    }
}

/// The source-port search of spec §5.3 as a pure function: the lowest free port in
/// [1024, 65535] such that the reply `remote → local` lands on `queue` (both hash byte orders).
/// Without RSS (`rss == None`, one queue receives everything) the lowest free port wins.
/// The port is not taken; the caller marks it in `ports`.
pub fn search_source_port(
    rss: Option<&Rss>,
    queue: u16,
    local_ip: Ipv4Addr,
    remote_ip: Ipv4Addr,
    remote_port: u16,
    ports: &PortBitmap,
) -> Result<u16, RssError> {
    let found = match rss {
        None => ports.lowest_free_client_port(|_| true),
        Some(rss) => {
            // Hash the fixed ten bytes once; each candidate adds two lookups.
            let input = ipv4_tuple_input(remote_ip, local_ip, remote_port, 0);
            let base = input[..10].iter().enumerate().fold(0u32, |h, (i, b)| h ^ rss.table[i][usize::from(*b)]);
            ports.lowest_free_client_port(|p| {
                let [hi, lo] = p.to_be_bytes();
                let h = base ^ rss.table[10][usize::from(hi)] ^ rss.table[11][usize::from(lo)];
                rss.queue_of(h) == queue && rss.queue_of(h.swap_bytes()) == queue
            })
        }
    };
    found.ok_or(RssError::NoPortAvailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's "Verifying the RSS Hash Calculation" vectors: (destination, source, IPv4-only
    /// hash, IPv4+TCP hash). The input order is source address, destination address, source
    /// port, destination port.
    type Endpoint = (u8, u8, u8, u8, u16);
    const VECTORS: [(Endpoint, Endpoint, u32, u32); 5] = [
        ((161, 142, 100, 80, 1766), (66, 9, 149, 187, 2794), 0x323e8fc2, 0x51ccc178),
        ((65, 69, 140, 83, 4739), (199, 92, 111, 2, 14230), 0xd718262a, 0xc626b0ea),
        ((12, 22, 207, 184, 38024), (24, 19, 198, 95, 12898), 0xd2d0a5de, 0x5c2b394a),
        ((209, 142, 163, 6, 2217), (38, 27, 205, 30, 48228), 0x82989176, 0xafc7327f),
        ((202, 188, 127, 2, 1303), (153, 39, 163, 191, 44251), 0x5d1809c5, 0x10e828a2),
    ];

    #[test]
    fn microsoft_verification_vectors() {
        let rss = Rss::new(&MICROSOFT_KEY, &[0]).unwrap();
        for (dst, src, h_ip, h_ports) in VECTORS {
            let s = Ipv4Addr::new(src.0, src.1, src.2, src.3);
            let d = Ipv4Addr::new(dst.0, dst.1, dst.2, dst.3);
            let mut ip_only = [0u8; 8];
            ip_only[..4].copy_from_slice(&s.octets());
            ip_only[4..].copy_from_slice(&d.octets());
            assert_eq!(toeplitz(&MICROSOFT_KEY, &ip_only), h_ip);
            let with_ports = ipv4_tuple_input(s, d, src.4, dst.4);
            assert_eq!(toeplitz(&MICROSOFT_KEY, &with_ports), h_ports);
            assert_eq!(rss.hash(&with_ports), h_ports, "table hash");
        }
    }

    #[test]
    fn reta_and_key_validation() {
        assert_eq!(Rss::new(&MICROSOFT_KEY, &[]).unwrap_err(), RssError::BadReta);
        assert_eq!(Rss::new(&MICROSOFT_KEY, &[0, 1, 0]).unwrap_err(), RssError::BadReta);
        assert_eq!(Rss::new(&MICROSOFT_KEY[..15], &[0]).unwrap_err(), RssError::ShortKey);
        let rss = Rss::new(&MICROSOFT_KEY, &Rss::round_robin_reta(128, 3)).unwrap();
        assert_eq!(rss.queue_of(0), 0);
        assert_eq!(rss.queue_of(4), 1);
        assert_eq!(rss.queue_of(128 + 5), 2);
    }

    #[test]
    fn port_allocation_order_matches_original() {
        // Always-true predicate: 1024, 1025, ..., 65535, then nothing.
        let mut ports = PortBitmap::new();
        for expect in 1024..=65535u16 {
            let p = ports.lowest_free_client_port(|_| true).unwrap();
            assert_eq!(p, expect);
            assert!(ports.take(p));
        }
        assert_eq!(ports.lowest_free_client_port(|_| true), None);
        // After releasing everything, `port % 3 == 0` yields exactly the multiples of 3.
        for p in 1024..=65535u16 {
            assert!(ports.release(p));
        }
        let mut got = Vec::new();
        while let Some(p) = ports.lowest_free_client_port(|p| p % 3 == 0) {
            ports.take(p);
            got.push(p);
        }
        let expect: Vec<u16> = (1024..=65535u16).filter(|p| p % 3 == 0).collect();
        assert_eq!(got, expect);
        assert_eq!(ports.lowest_free_client_port(|p| p == 0), None);
    }

    #[test]
    fn search_steers_to_queue_and_is_lowest() {
        let rss = Rss::new(&MICROSOFT_KEY, &Rss::round_robin_reta(128, 4)).unwrap();
        let local = Ipv4Addr::new(198, 18, 0, 1);
        let remote = Ipv4Addr::new(198, 18, 0, 2);
        let mut ports = PortBitmap::new();
        ports.take(1024);
        for queue in 0..4u16 {
            let p = search_source_port(Some(&rss), queue, local, remote, 888, &ports).unwrap();
            assert!(rss.steers_to(queue, remote, local, 888, p));
            // Brute force agrees that nothing lower works.
            let lowest = (1024..=65535u16).find(|&c| !ports.is_used(c) && rss.steers_to(queue, remote, local, 888, c));
            assert_eq!(Some(p), lowest);
        }
        // No RSS: the lowest free port.
        assert_eq!(search_source_port(None, 0, local, remote, 888, &ports), Ok(1025));
        // A queue the RETA never names: exhausted.
        assert_eq!(search_source_port(Some(&rss), 9, local, remote, 888, &ports), Err(RssError::NoPortAvailable));
    }
}
