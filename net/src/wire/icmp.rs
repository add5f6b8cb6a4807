//! ICMP echo request and reply (RFC 792). Other ICMP messages are `Unsupported`.

use super::checksum;
use super::field::{set_u16, u16_at};
use super::{ChecksumCaps, Error, Result};

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    pub const IDENT: usize = 4;
    pub const SEQ: usize = 6;
    pub const DATA: usize = 8;
}

/// Length of an ICMP echo header.
pub const HEADER_LEN: usize = field::DATA;

/// A view of an ICMP message. The message runs to the end of the buffer (callers pass the IP
/// payload, whose length the IP header fixed).
#[derive(Debug, Clone)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        IcmpPacket { buffer }
    }
    /// Wraps a buffer after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// `Err(Truncated)` below 8 bytes.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }
    /// Message code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::IDENT)
    }
    /// Echo sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::SEQ)
    }
    /// True if the checksum over the whole message verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> IcmpPacket<&'a T> {
    /// Echo data.
    pub fn data(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::DATA..]
    }
}

/// Echo request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpEchoKind {
    /// Type 8.
    Request,
    /// Type 0.
    Reply,
}

/// A validated ICMP echo message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpEchoRepr<'a> {
    /// Request or reply.
    pub kind: IcmpEchoKind,
    /// Identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq_no: u16,
    /// Payload, echoed byte for byte.
    pub data: &'a [u8],
}

impl<'a> IcmpEchoRepr<'a> {
    /// Validates an echo request or reply (code 0); checksum verified if `caps.icmp.rx()`.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(p: &IcmpPacket<&'a T>, caps: ChecksumCaps) -> Result<Self> {
        p.check_len()?;
        if caps.icmp.rx() && !p.verify_checksum() {
            return Err(Error::Checksum);
        }
        let kind = match (p.msg_type(), p.msg_code()) {
            (8, 0) => IcmpEchoKind::Request,
            (0, 0) => IcmpEchoKind::Reply,
            _ => return Err(Error::Unsupported),
        };
        Ok(IcmpEchoRepr { kind, ident: p.echo_ident(), seq_no: p.echo_seq_no(), data: p.data() })
    }

    /// The reply to this request.
    pub fn reply(&self) -> IcmpEchoRepr<'a> {
        IcmpEchoRepr { kind: IcmpEchoKind::Reply, ..*self }
    }

    /// Header plus data.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Writes the message into `buf`; the checksum is computed if `caps.icmp.tx()`.
    pub fn emit(&self, buf: &mut [u8], caps: ChecksumCaps) -> Result<()> {
        let len = self.buffer_len();
        if buf.len() < len {
            return Err(Error::BufferTooSmall);
        }
        let buf = &mut buf[..len];
        buf[field::TYPE] = match self.kind {
            IcmpEchoKind::Request => 8,
            IcmpEchoKind::Reply => 0,
        };
        buf[field::CODE] = 0;
        set_u16(buf, field::CHECKSUM, 0);
        set_u16(buf, field::IDENT, self.ident);
        set_u16(buf, field::SEQ, self.seq_no);
        buf[field::DATA..].copy_from_slice(self.data);
        if caps.icmp.tx() {
            let c = !checksum::data(buf);
            set_u16(buf, field::CHECKSUM, c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_roundtrip_and_unsupported() {
        let req = IcmpEchoRepr { kind: IcmpEchoKind::Request, ident: 777, seq_no: 3, data: b"0123456789abcdefg" };
        let mut b = [0u8; 25];
        req.emit(&mut b, ChecksumCaps::software()).unwrap();
        let p = IcmpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(IcmpEchoRepr::parse(&p, ChecksumCaps::software()).unwrap(), req);
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(
            IcmpEchoRepr::parse(&IcmpPacket::new_unchecked(&bad[..]), ChecksumCaps::software()),
            Err(Error::Checksum)
        );
        let mut unreach = b;
        unreach[0] = 3;
        assert_eq!(
            IcmpEchoRepr::parse(&IcmpPacket::new_unchecked(&unreach[..]), ChecksumCaps::tx_only()),
            Err(Error::Unsupported)
        );
        assert_eq!(IcmpPacket::new_checked(&b[..7]).unwrap_err(), Error::Truncated);
    }
}
