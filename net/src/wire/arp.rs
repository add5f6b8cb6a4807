//! ARP for IPv4 over Ethernet (RFC 826).

use super::ethernet::EthernetAddress;
use super::field::{set_u16, u16_at, Field};
use super::{Error, Result};
use core::net::Ipv4Addr;

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOperation {
    /// 1: who-has.
    Request,
    /// 2: is-at.
    Reply,
    /// Anything else.
    Unknown(u16),
}

impl From<u16> for ArpOperation {
    fn from(v: u16) -> Self {
        match v {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            o => ArpOperation::Unknown(o),
        }
    }
}

impl From<ArpOperation> for u16 {
    fn from(v: ArpOperation) -> u16 {
        match v {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
            ArpOperation::Unknown(o) => o,
        }
    }
}

mod field {
    use super::Field;
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// Length of an IPv4-over-Ethernet ARP packet.
pub const PACKET_LEN: usize = 28;

/// A view of an ARP packet (IPv4 over Ethernet layout).
#[derive(Debug, Clone)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        ArpPacket { buffer }
    }
    /// Wraps a buffer after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// `Err(Truncated)` if the buffer cannot hold a 28-byte packet.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < PACKET_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    /// Hardware type.
    pub fn hardware_type(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::HTYPE)
    }
    /// Protocol type.
    pub fn protocol_type(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::PTYPE)
    }
    /// Hardware address length.
    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }
    /// Protocol address length.
    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }
    /// Operation.
    pub fn operation(&self) -> ArpOperation {
        u16_at(self.buffer.as_ref(), field::OPER).into()
    }
    /// Sender hardware address.
    pub fn source_hardware_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::SHA])
    }
    /// Sender protocol address.
    pub fn source_protocol_addr(&self) -> Ipv4Addr {
        ip_at(self.buffer.as_ref(), field::SPA.start)
    }
    /// Target hardware address.
    pub fn target_hardware_addr(&self) -> EthernetAddress {
        EthernetAddress::from_bytes(&self.buffer.as_ref()[field::THA])
    }
    /// Target protocol address.
    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        ip_at(self.buffer.as_ref(), field::TPA.start)
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// A validated ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    /// Request or reply.
    pub operation: ArpOperation,
    /// Sender MAC.
    pub source_hardware_addr: EthernetAddress,
    /// Sender IPv4 address.
    pub source_protocol_addr: Ipv4Addr,
    /// Target MAC (zero in requests).
    pub target_hardware_addr: EthernetAddress,
    /// Target IPv4 address.
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    /// Validates an ARP packet: hardware type 1, protocol 0x0800, lengths 6 and 4, operation
    /// request or reply; anything else is `Unsupported`.
    pub fn parse<T: AsRef<[u8]>>(p: &ArpPacket<T>) -> Result<Self> {
        p.check_len()?;
        if p.hardware_type() != 1 || p.protocol_type() != 0x0800 || p.hardware_len() != 6 || p.protocol_len() != 4 {
            return Err(Error::Unsupported);
        }
        let operation = p.operation();
        if let ArpOperation::Unknown(_) = operation {
            return Err(Error::Unsupported);
        }
        Ok(ArpRepr {
            operation,
            source_hardware_addr: p.source_hardware_addr(),
            source_protocol_addr: p.source_protocol_addr(),
            target_hardware_addr: p.target_hardware_addr(),
            target_protocol_addr: p.target_protocol_addr(),
        })
    }

    /// A broadcast-able who-has request.
    pub fn request(sha: EthernetAddress, spa: Ipv4Addr, tpa: Ipv4Addr) -> Self {
        ArpRepr {
            operation: ArpOperation::Request,
            source_hardware_addr: sha,
            source_protocol_addr: spa,
            target_hardware_addr: EthernetAddress::ZERO,
            target_protocol_addr: tpa,
        }
    }

    /// The reply to `request` from the owner of `mac`.
    pub fn reply_to(request: &ArpRepr, mac: EthernetAddress) -> Self {
        ArpRepr {
            operation: ArpOperation::Reply,
            source_hardware_addr: mac,
            source_protocol_addr: request.target_protocol_addr,
            target_hardware_addr: request.source_hardware_addr,
            target_protocol_addr: request.source_protocol_addr,
        }
    }

    /// 28.
    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }

    /// Writes the packet into the first 28 bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if buf.len() < PACKET_LEN {
            return Err(Error::BufferTooSmall);
        }
        set_u16(buf, field::HTYPE, 1);
        set_u16(buf, field::PTYPE, 0x0800);
        buf[field::HLEN] = 6;
        buf[field::PLEN] = 4;
        set_u16(buf, field::OPER, self.operation.into());
        buf[field::SHA].copy_from_slice(&self.source_hardware_addr.0);
        buf[field::SPA].copy_from_slice(&self.source_protocol_addr.octets());
        buf[field::THA].copy_from_slice(&self.target_hardware_addr.0);
        buf[field::TPA].copy_from_slice(&self.target_protocol_addr.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_other_kinds() {
        let req = ArpRepr::request(
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(198, 18, 0, 2),
        );
        let mut b = [0u8; 28];
        req.emit(&mut b).unwrap();
        assert_eq!(ArpRepr::parse(&ArpPacket::new_checked(&b[..]).unwrap()).unwrap(), req);
        let mut bad = b;
        bad[1] = 6; // hardware type 6
        assert_eq!(ArpRepr::parse(&ArpPacket::new_unchecked(&bad[..])), Err(Error::Unsupported));
        let mut bad = b;
        bad[7] = 3; // RARP request
        assert_eq!(ArpRepr::parse(&ArpPacket::new_unchecked(&bad[..])), Err(Error::Unsupported));
        assert_eq!(ArpPacket::new_checked(&b[..27]).unwrap_err(), Error::Truncated);
        let reply = ArpRepr::reply_to(&req, EthernetAddress([2, 0, 0, 0, 0, 2]));
        assert_eq!(reply.target_hardware_addr, req.source_hardware_addr);
        assert_eq!(reply.source_protocol_addr, req.target_protocol_addr);
    }
}
