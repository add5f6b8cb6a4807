//! IPv4 (RFC 791): options are skipped on receive, never emitted; fragments are refused.

use super::checksum;
use super::field::{set_u16, u16_at, Field};
use super::{ChecksumCaps, Error, Result};
use core::net::Ipv4Addr;

/// IP protocol numbers this stack distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// 1.
    Icmp,
    /// 6.
    Tcp,
    /// 17.
    Udp,
    /// Anything else.
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(v: u8) -> Self {
        match v {
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            o => IpProtocol::Unknown(o),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(v: IpProtocol) -> u8 {
        match v {
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Unknown(o) => o,
        }
    }
}

mod field {
    use super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;
/// Identification written on every emitted packet (the original's constant; with DF set the
/// field carries no meaning).
pub const IDENT: u16 = 0x1513;
const FLAG_DF: u16 = 0x4000;
pub(crate) const FLAG_MF: u16 = 0x2000;
pub(crate) const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet. After `new_checked`, the header length and total length fields
/// are consistent with the buffer, so [`payload`](Ipv4Packet::payload) cannot panic.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }
    /// Wraps a buffer after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Checks `20 <= header_len <= total_len <= buffer length`. A buffer longer than the total
    /// length (Ethernet padding) is fine.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hl = self.header_len() as usize;
        let tl = self.total_len() as usize;
        if hl < HEADER_LEN || tl < hl {
            return Err(Error::Malformed);
        }
        if len < tl {
            return Err(Error::Truncated);
        }
        Ok(())
    }
    /// Version field (4 for IPv4).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }
    /// Header length in bytes (IHL × 4).
    #[inline]
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    /// DSCP and ECN byte.
    #[inline]
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }
    /// Total length (header + payload).
    #[inline]
    pub fn total_len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::LENGTH)
    }
    /// Identification.
    #[inline]
    pub fn ident(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::IDENT)
    }
    /// Don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        u16_at(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }
    /// More-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        u16_at(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }
    /// Fragment offset in bytes.
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (u16_at(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) << 3
    }
    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    /// Protocol.
    #[inline]
    pub fn protocol(&self) -> IpProtocol {
        self.buffer.as_ref()[field::PROTOCOL].into()
    }
    /// Header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST_ADDR];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    /// True if the header checksum (over `header_len` bytes) verifies.
    pub fn verify_checksum(&self) -> bool {
        let hl = self.header_len() as usize;
        checksum::data(&self.buffer.as_ref()[..hl]) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Ipv4Packet<&'a T> {
    /// The payload: bytes between the header (with options) and the total length.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        let hl = self.header_len() as usize;
        let tl = self.total_len() as usize;
        &self.buffer.as_ref()[hl..tl]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Recomputes the header checksum over `header_len` bytes.
    pub fn fill_checksum(&mut self) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, 0);
        let hl = self.header_len() as usize;
        let c = !checksum::data(&self.buffer.as_ref()[..hl]);
        set_u16(self.buffer.as_mut(), field::CHECKSUM, c);
    }
    /// The payload region, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len() as usize;
        let tl = self.total_len() as usize;
        &mut self.buffer.as_mut()[hl..tl]
    }
}

/// A validated IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Payload protocol.
    pub protocol: IpProtocol,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Time to live.
    pub ttl: u8,
}

impl Ipv4Repr {
    /// Validates a packet: version 4, lengths consistent, checksum (if `caps.ipv4.rx()`), not a
    /// fragment (`Error::Fragmented`, checked after the checksum). Options are skipped.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(p: &Ipv4Packet<&T>, caps: ChecksumCaps) -> Result<Self> {
        p.check_len()?;
        if p.version() != 4 {
            return Err(Error::Malformed);
        }
        if caps.ipv4.rx() && !p.verify_checksum() {
            return Err(Error::Checksum);
        }
        if p.more_frags() || p.frag_offset() != 0 {
            return Err(Error::Fragmented);
        }
        Ok(Ipv4Repr {
            src_addr: p.src_addr(),
            dst_addr: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: usize::from(p.total_len()) - usize::from(p.header_len()),
            ttl: p.ttl(),
        })
    }

    /// 20: emitted headers never carry options.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes a 20-byte header (IHL 5, DSCP 0, ident 0x1513, DF, this TTL) into `buf`; the
    /// checksum is computed if `caps.ipv4.tx()`, else left zero for the device.
    pub fn emit(&self, buf: &mut [u8], caps: ChecksumCaps) -> Result<()> {
        self.emit_header(buf.first_chunk_mut().ok_or(Error::BufferTooSmall)?, caps)
    }

    /// [`emit`](Self::emit) into exactly the header's 20 bytes (a fixed-size target: no length
    /// checks left once inlined, which is what `FrameRepr::emit` relies on).
    #[inline]
    pub fn emit_header(&self, h: &mut [u8; HEADER_LEN], caps: ChecksumCaps) -> Result<()> {
        let total = u16::try_from(HEADER_LEN + self.payload_len).map_err(|_| Error::BufferTooSmall)?;
        let buf = &mut h[..];
        buf[field::VER_IHL] = 0x45;
        buf[field::DSCP_ECN] = 0;
        set_u16(buf, field::LENGTH, total);
        set_u16(buf, field::IDENT, IDENT);
        set_u16(buf, field::FLG_OFF, FLAG_DF);
        buf[field::TTL] = self.ttl;
        buf[field::PROTOCOL] = self.protocol.into();
        set_u16(buf, field::CHECKSUM, 0);
        buf[field::SRC_ADDR].copy_from_slice(&self.src_addr.octets());
        buf[field::DST_ADDR].copy_from_slice(&self.dst_addr.octets());
        if caps.ipv4.tx() {
            // Summed from the values, not read back (see `checksum::term`).
            let [l0, l1] = total.to_be_bytes();
            let [i0, i1] = IDENT.to_be_bytes();
            let [f0, f1] = FLAG_DF.to_be_bytes();
            let sum = checksum::term([0x45, 0, l0, l1])
                + checksum::term([i0, i1, f0, f1])
                + checksum::term([self.ttl, self.protocol.into(), 0, 0])
                + checksum::term(self.src_addr.octets())
                + checksum::term(self.dst_addr.octets());
            set_u16(buf, field::CHECKSUM, !checksum::with_terms(sum, &[]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; 28] {
        let r = Ipv4Repr {
            src_addr: Ipv4Addr::new(198, 18, 0, 1),
            dst_addr: Ipv4Addr::new(198, 18, 0, 2),
            protocol: IpProtocol::Udp,
            payload_len: 8,
            ttl: 64,
        };
        let mut b = [0u8; 28];
        r.emit(&mut b, ChecksumCaps::software()).unwrap();
        b
    }

    #[test]
    fn roundtrip_and_checksum() {
        let b = sample();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.verify_checksum());
        assert!(p.dont_frag());
        let r = Ipv4Repr::parse(&p, ChecksumCaps::software()).unwrap();
        assert_eq!(r.payload_len, 8);
        let mut bad = b;
        bad[8] = 63; // ttl changed, checksum stale
        let p = Ipv4Packet::new_checked(&bad[..]).unwrap();
        assert_eq!(Ipv4Repr::parse(&p, ChecksumCaps::software()), Err(Error::Checksum));
        assert!(Ipv4Repr::parse(&p, ChecksumCaps::tx_only()).is_ok());
    }

    #[test]
    fn fragments_are_refused() {
        for flg in [0x2000u16 /* MF */, 0x0001 /* offset 8 */] {
            let mut b = sample();
            set_u16(&mut b, 6, flg);
            let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
            p.fill_checksum();
            let p = Ipv4Packet::new_checked(&b[..]).unwrap();
            assert_eq!(Ipv4Repr::parse(&p, ChecksumCaps::software()), Err(Error::Fragmented));
        }
    }

    #[test]
    fn options_are_skipped_and_lengths_checked() {
        // IHL 6 with one 4-byte option (NOP NOP NOP EOL), 4 bytes of payload.
        let mut b = [0u8; 28];
        b[0] = 0x46;
        set_u16(&mut b, 2, 28);
        b[8] = 64;
        b[9] = 17;
        b[20..24].copy_from_slice(&[1, 1, 1, 0]);
        b[24..28].copy_from_slice(b"abcd");
        Ipv4Packet::new_unchecked(&mut b[..]).fill_checksum();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload(), b"abcd");
        assert_eq!(Ipv4Repr::parse(&p, ChecksumCaps::software()).unwrap().payload_len, 4);
        // Total length beyond the buffer, IHL below 5, total below header: all rejected.
        let mut t = b;
        set_u16(&mut t, 2, 29);
        assert_eq!(Ipv4Packet::new_checked(&t[..]).unwrap_err(), Error::Truncated);
        let mut t = b;
        t[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(&t[..]).unwrap_err(), Error::Malformed);
        let mut t = b;
        set_u16(&mut t, 2, 20);
        assert_eq!(Ipv4Packet::new_checked(&t[..]).unwrap_err(), Error::Malformed);
        let mut t = b;
        t[0] = 0x66;
        Ipv4Packet::new_unchecked(&mut t[..]).fill_checksum();
        assert_eq!(
            Ipv4Repr::parse(&Ipv4Packet::new_checked(&t[..]).unwrap(), ChecksumCaps::software()),
            Err(Error::Malformed)
        );
    }
}
