//! Whole frames: one-pass classification of received frames, and emission of Machnet frames.

use super::arp::{ArpPacket, ArpRepr, PACKET_LEN as ARP_LEN};
use super::ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr, HEADER_LEN as ETH_LEN};
use super::icmp::{IcmpEchoRepr, IcmpPacket};
use super::ipv4::{IpProtocol, Ipv4Packet, Ipv4Repr, HEADER_LEN as IP_LEN};
use super::machnet::{MachnetHeader, MachnetRepr, HEADER_LEN as MN_LEN};
use super::udp::{UdpPacket, UdpRepr, HEADER_LEN as UDP_LEN};
use super::{ChecksumCaps, Error, Result};
use core::net::Ipv4Addr;

/// Bytes of headers in front of a Machnet payload: 14 + 20 + 8 + 54 = 96.
pub const FRAME_HEADER_LEN: usize = ETH_LEN + IP_LEN + UDP_LEN + MN_LEN;
static_assertions::const_assert_eq!(FRAME_HEADER_LEN, 96);

/// TTL of every packet this stack emits.
pub const TTL: u8 = 64;

/// A received Machnet packet, validated through every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachnetFrame<'a> {
    /// Ethernet source (the peer's MAC, or its router's).
    pub src_mac: EthernetAddress,
    /// Ethernet destination.
    pub dst_mac: EthernetAddress,
    /// IPv4 source.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// The Machnet header.
    pub hdr: MachnetRepr,
    /// Machnet payload (bounded by the UDP length).
    pub payload: &'a [u8],
}

/// A received ICMP echo message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpFrame<'a> {
    /// Ethernet header.
    pub eth: EthernetRepr,
    /// IPv4 header.
    pub ip: Ipv4Repr,
    /// Echo request or reply.
    pub echo: IcmpEchoRepr<'a>,
}

impl IcmpFrame<'_> {
    /// Writes the echo reply to this request into `buf`, from `local_mac`, with the request's
    /// payload byte for byte. Returns the frame length.
    pub fn emit_reply(&self, buf: &mut [u8], local_mac: EthernetAddress, caps: ChecksumCaps) -> Result<usize> {
        let echo = self.echo.reply();
        let ip = Ipv4Repr {
            src_addr: self.ip.dst_addr,
            dst_addr: self.ip.src_addr,
            protocol: IpProtocol::Icmp,
            payload_len: echo.buffer_len(),
            ttl: TTL,
        };
        let len = ETH_LEN + IP_LEN + echo.buffer_len();
        if buf.len() < len {
            return Err(Error::BufferTooSmall);
        }
        EthernetRepr { src_addr: local_mac, dst_addr: self.eth.src_addr, ethertype: EtherType::Ipv4 }.emit(buf)?;
        ip.emit(&mut buf[ETH_LEN..], caps)?;
        echo.emit(&mut buf[ETH_LEN + IP_LEN..], caps)?;
        Ok(len)
    }
}

/// What a received frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An ARP request or reply.
    Arp {
        /// Ethernet header.
        eth: EthernetRepr,
        /// ARP body.
        arp: ArpRepr,
    },
    /// An ICMP echo request or reply.
    Icmp(IcmpFrame<'a>),
    /// A Machnet packet.
    Machnet(MachnetFrame<'a>),
}

/// Parses a received frame through every layer in one pass.
///
/// Ethernet padding after the IPv4 total length is accepted. Errors: anything truncated or
/// inconsistent, bad checksums (per `caps`), IPv4 fragments, and everything that is neither ARP,
/// ICMP echo, nor UDP carrying the Machnet magic (`Unsupported` / `BadMagic`).
pub fn classify(buf: &[u8], caps: ChecksumCaps) -> Result<Frame<'_>> {
    let eth = EthernetFrame::new_checked(buf)?;
    match eth.ethertype() {
        EtherType::Ipv4 => {}
        EtherType::Arp => {
            let eth_repr = EthernetRepr::parse(&eth)?;
            let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload())?)?;
            return Ok(Frame::Arp { eth: eth_repr, arp });
        }
        _ => return Err(Error::Unsupported),
    }
    let ip = Ipv4Packet::new_checked(eth.payload())?;
    let ip_repr = Ipv4Repr::parse(&ip, caps)?;
    match ip_repr.protocol {
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(ip.payload())?;
            let udp_repr = UdpRepr::parse(&udp, ip_repr.src_addr, ip_repr.dst_addr, caps)?;
            let mh = MachnetHeader::new_checked(udp.payload())?;
            let hdr = MachnetRepr::parse(&mh)?;
            Ok(Frame::Machnet(MachnetFrame {
                src_mac: eth.src_addr(),
                dst_mac: eth.dst_addr(),
                src_ip: ip_repr.src_addr,
                dst_ip: ip_repr.dst_addr,
                src_port: udp_repr.src_port,
                dst_port: udp_repr.dst_port,
                hdr,
                payload: mh.payload(),
            }))
        }
        IpProtocol::Icmp => {
            let echo = IcmpEchoRepr::parse(&IcmpPacket::new_checked(ip.payload())?, caps)?;
            Ok(Frame::Icmp(IcmpFrame { eth: EthernetRepr::parse(&eth)?, ip: ip_repr, echo }))
        }
        _ => Err(Error::Unsupported),
    }
}

/// Writes an Ethernet + ARP frame (42 bytes, unpadded) and returns its length.
pub fn emit_arp(buf: &mut [u8], src_mac: EthernetAddress, dst_mac: EthernetAddress, arp: &ArpRepr) -> Result<usize> {
    let len = ETH_LEN + ARP_LEN;
    if buf.len() < len {
        return Err(Error::BufferTooSmall);
    }
    EthernetRepr { src_addr: src_mac, dst_addr: dst_mac, ethertype: EtherType::Arp }.emit(buf)?;
    arp.emit(&mut buf[ETH_LEN..])?;
    Ok(len)
}

/// Everything needed to emit one Machnet frame's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRepr {
    /// Ethernet source.
    pub src_mac: EthernetAddress,
    /// Ethernet destination.
    pub dst_mac: EthernetAddress,
    /// IPv4 source.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// Machnet header.
    pub hdr: MachnetRepr,
}

impl FrameRepr {
    /// Writes the 96 header bytes in front of a payload of `payload_len` bytes that is **already
    /// in place** at `buf[96..]`, computing checksums per `caps`. Returns the frame length.
    #[inline]
    pub fn emit(&self, buf: &mut [u8], payload_len: usize, caps: ChecksumCaps) -> Result<usize> {
        let len = FRAME_HEADER_LEN + payload_len;
        if buf.len() < len {
            return Err(Error::BufferTooSmall);
        }
        let buf = &mut buf[..len];
        EthernetRepr { src_addr: self.src_mac, dst_addr: self.dst_mac, ethertype: EtherType::Ipv4 }.emit(buf)?;
        let udp_len = UDP_LEN + MN_LEN + payload_len;
        Ipv4Repr {
            src_addr: self.src_ip,
            dst_addr: self.dst_ip,
            protocol: IpProtocol::Udp,
            payload_len: udp_len,
            ttl: TTL,
        }
        .emit(&mut buf[ETH_LEN..], caps)?;
        let l4 = &mut buf[ETH_LEN + IP_LEN..];
        self.hdr.emit(&mut l4[UDP_LEN..])?;
        UdpRepr { src_port: self.src_port, dst_port: self.dst_port }.emit(
            l4,
            self.src_ip,
            self.dst_ip,
            MN_LEN + payload_len,
            caps,
        )?;
        Ok(len)
    }

    /// Copies `payload` behind the headers and emits the whole frame.
    pub fn emit_with_payload(&self, buf: &mut [u8], payload: &[u8], caps: ChecksumCaps) -> Result<usize> {
        let end = FRAME_HEADER_LEN + payload.len();
        if buf.len() < end {
            return Err(Error::BufferTooSmall);
        }
        buf[FRAME_HEADER_LEN..end].copy_from_slice(payload);
        self.emit(buf, payload.len(), caps)
    }
}
