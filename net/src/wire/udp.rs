//! UDP (RFC 768) with the IPv4 pseudo-header checksum.

use super::checksum;
use super::field::{set_u16, u16_at};
use super::{ChecksumCaps, Error, Result};
use core::net::Ipv4Addr;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// A view of a UDP datagram. After `new_checked` the length field is within the buffer.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }
    /// Wraps a buffer after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Checks `8 <= length field <= buffer length`.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let l = usize::from(self.len());
        if l < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if l > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }
    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::SRC_PORT)
    }
    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::DST_PORT)
    }
    /// Length field (header + payload).
    #[inline]
    #[allow(clippy::len_without_is_empty)] // a length field, not a container length
    pub fn len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::LENGTH)
    }
    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// True if the checksum verifies, or is zero ("no checksum", legal for UDP over IPv4).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        let data = &self.buffer.as_ref()[..usize::from(len)];
        checksum::pseudo_and_data(src, dst, PROTO_UDP, len, data) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> UdpPacket<&'a T> {
    /// The payload (up to the length field; trailing bytes are ignored).
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Computes the full checksum (pseudo-header, header, payload) in software.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let len = self.len();
        set_u16(self.buffer.as_mut(), field::CHECKSUM, 0);
        let data = &self.buffer.as_ref()[..usize::from(len)];
        let sum = checksum::pseudo_and_data(src, dst, PROTO_UDP, len, data);
        self.set_checksum_of(sum);
    }
    /// Writes the checksum for `sum`, the folded sum of the pseudo-header and the datagram
    /// with a zero checksum field (as [`checksum::pseudo_and_data`] gives it): its complement,
    /// a computed zero sent as all ones (zero means "no checksum").
    #[inline]
    pub fn set_checksum_of(&mut self, sum: u16) {
        let c = !sum;
        set_u16(self.buffer.as_mut(), field::CHECKSUM, if c == 0 { 0xffff } else { c });
    }
    /// Writes the pseudo-header sum (not complemented), as devices that offload the UDP
    /// checksum expect.
    pub fn fill_pseudo_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let len = self.len();
        set_u16(self.buffer.as_mut(), field::CHECKSUM, checksum::pseudo_header(src, dst, PROTO_UDP, len));
    }
}

/// A validated UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl UdpRepr {
    /// Validates a datagram; the checksum is verified if `caps.udp.rx()` and non-zero.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(
        p: &UdpPacket<&T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        caps: ChecksumCaps,
    ) -> Result<Self> {
        p.check_len()?;
        if caps.udp.rx() && !p.verify_checksum(src, dst) {
            return Err(Error::Checksum);
        }
        Ok(UdpRepr { src_port: p.src_port(), dst_port: p.dst_port() })
    }

    /// 8.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the ports and the length field `len` (header + payload) into exactly the header's
    /// 8 bytes, leaving the checksum field to [`UdpPacket::fill_checksum`] or
    /// [`UdpPacket::fill_pseudo_checksum`].
    #[inline]
    pub fn emit_header(&self, h: &mut [u8; HEADER_LEN], len: u16) {
        set_u16(h, field::SRC_PORT, self.src_port);
        set_u16(h, field::DST_PORT, self.dst_port);
        set_u16(h, field::LENGTH, len);
    }

    /// Writes the header for a payload of `payload_len` bytes that is **already in place**
    /// at `buf[8..]`. The checksum is computed in software if `caps.udp.tx()`, else seeded
    /// with the pseudo-header sum for the device.
    pub fn emit(
        &self,
        buf: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        payload_len: usize,
        caps: ChecksumCaps,
    ) -> Result<()> {
        let len = HEADER_LEN + payload_len;
        if buf.len() < len {
            return Err(Error::BufferTooSmall);
        }
        let len16 = u16::try_from(len).map_err(|_| Error::BufferTooSmall)?;
        self.emit_header(buf.first_chunk_mut().ok_or(Error::BufferTooSmall)?, len16);
        let mut p = UdpPacket::new_unchecked(&mut buf[..len]);
        if caps.udp.tx() {
            p.fill_checksum(src, dst);
        } else {
            p.fill_pseudo_checksum(src, dst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Checksum;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    #[test]
    fn checksum_roundtrip_zero_and_corruption() {
        let mut b = [0u8; 13];
        b[8..].copy_from_slice(b"hello");
        let r = UdpRepr { src_port: 1024, dst_port: 888 };
        r.emit(&mut b, SRC, DST, 5, ChecksumCaps::software()).unwrap();
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(UdpRepr::parse(&p, SRC, DST, ChecksumCaps::software()), Ok(r));
        assert_eq!(p.payload(), b"hello");
        // Wrong pseudo-header (other destination) fails.
        assert_eq!(
            UdpRepr::parse(&p, SRC, Ipv4Addr::new(198, 18, 0, 3), ChecksumCaps::software()),
            Err(Error::Checksum)
        );
        // A flipped payload bit fails; a zero checksum is accepted.
        let mut c = b;
        c[10] ^= 0x40;
        assert_eq!(
            UdpRepr::parse(&UdpPacket::new_unchecked(&c[..]), SRC, DST, ChecksumCaps::software()),
            Err(Error::Checksum)
        );
        c[6] = 0;
        c[7] = 0;
        assert!(UdpRepr::parse(&UdpPacket::new_unchecked(&c[..]), SRC, DST, ChecksumCaps::software()).is_ok());
    }

    #[test]
    fn offload_seeds_pseudo_header() {
        let mut b = [0u8; 8];
        let caps = ChecksumCaps { udp: Checksum::Rx, ..ChecksumCaps::software() };
        UdpRepr { src_port: 1, dst_port: 2 }.emit(&mut b, SRC, DST, 0, caps).unwrap();
        assert_eq!(u16_at(&b, 6), checksum::pseudo_header(SRC, DST, 17, 8));
    }

    #[test]
    fn lengths() {
        assert_eq!(UdpPacket::new_checked(&[0u8; 7][..]).unwrap_err(), Error::Truncated);
        let mut b = [0u8; 8];
        set_u16(&mut b, 4, 7);
        assert_eq!(UdpPacket::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        set_u16(&mut b, 4, 9);
        assert_eq!(UdpPacket::new_checked(&b[..]).unwrap_err(), Error::Truncated);
    }
}
