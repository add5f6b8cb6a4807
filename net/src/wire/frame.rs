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

impl MachnetFrame<'_> {
    /// The headers that emit this frame again (with [`FrameRepr::emit_with_payload`] and the
    /// payload).
    pub fn repr(&self) -> FrameRepr {
        FrameRepr {
            src_mac: self.src_mac,
            dst_mac: self.dst_mac,
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            hdr: self.hdr,
        }
    }
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
#[inline]
pub fn classify(buf: &[u8], caps: ChecksumCaps) -> Result<Frame<'_>> {
    match machnet_fast(buf, caps) {
        Some(m) => Ok(Frame::Machnet(m)),
        None => classify_layered(buf, caps),
    }
}

/// [`classify`] layer by layer, without its fast path for Machnet frames: what `classify`
/// runs for everything but the common case, public so that tests and the fuzzer can check that
/// the two agree.
pub fn classify_layered(buf: &[u8], caps: ChecksumCaps) -> Result<Frame<'_>> {
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

/// [`classify`]'s common case: a Machnet packet behind a 20-byte IPv4 header, checked in one
/// straight pass over fixed offsets instead of layer by layer. `None` for anything else, and for
/// anything the layered parse rejects; the caller then runs the layered parse, which also names
/// the error. Where it returns a frame, it is the frame the layered parse returns, and it
/// returns one for every Machnet frame the layered parse accepts with a 20-byte IPv4 header
/// (the unit tests and the `frame_classify` fuzzer check both on valid and damaged frames).
#[inline]
fn machnet_fast(buf: &[u8], caps: ChecksumCaps) -> Option<MachnetFrame<'_>> {
    const IP: usize = ETH_LEN;
    const UDP: usize = ETH_LEN + IP_LEN;
    let h: &[u8; FRAME_HEADER_LEN] = buf.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
    let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
    // IPv4 (EtherType 0x0800), version 4 with no options, UDP (17), not a fragment (neither
    // more-fragments nor an offset; don't-fragment is fine).
    let fragment = super::ipv4::FLAG_MF | super::ipv4::OFFSET_MASK;
    if be16(12) != u16::from(EtherType::Ipv4)
        || h[IP] != 0x45
        || h[IP + 9] != u8::from(IpProtocol::Udp)
        || be16(IP + 6) & fragment != 0
    {
        return None;
    }
    let total = usize::from(be16(IP + 2));
    let udp_len = usize::from(be16(UDP + 4));
    if IP + total > buf.len() || udp_len < UDP_LEN + MN_LEN || udp_len > total.checked_sub(IP_LEN)? {
        return None;
    }
    if caps.ipv4.rx() && super::checksum::data(&h[IP..UDP]) != 0xffff {
        return None;
    }
    let src_ip = Ipv4Addr::new(h[IP + 12], h[IP + 13], h[IP + 14], h[IP + 15]);
    let dst_ip = Ipv4Addr::new(h[IP + 16], h[IP + 17], h[IP + 18], h[IP + 19]);
    let udp = UdpPacket::new_unchecked(&buf[UDP..UDP + udp_len]);
    if caps.udp.rx() && !udp.verify_checksum(src_ip, dst_ip) {
        return None;
    }
    let mh = MachnetHeader::new_unchecked(udp.payload());
    let hdr = MachnetRepr::parse(&mh).ok()?;
    Some(MachnetFrame {
        src_mac: EthernetAddress([h[6], h[7], h[8], h[9], h[10], h[11]]),
        dst_mac: EthernetAddress([h[0], h[1], h[2], h[3], h[4], h[5]]),
        src_ip,
        dst_ip,
        src_port: be16(UDP),
        dst_port: be16(UDP + 2),
        hdr,
        payload: mh.payload(),
    })
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
        let udp_len = u16::try_from(UDP_LEN + MN_LEN + payload_len).map_err(|_| Error::BufferTooSmall)?;
        let buf = buf.get_mut(..len).ok_or(Error::BufferTooSmall)?;
        // Each layer writes into its fixed-size part of the 96 header bytes (no length checks
        // left once inlined; through the layers' slice-taking `emit`s this cost about a third
        // more), then the UDP checksum over the whole datagram.
        let (h, _) = buf.split_first_chunk_mut::<FRAME_HEADER_LEN>().ok_or(Error::BufferTooSmall)?;
        let (eth, h) = h.split_first_chunk_mut::<ETH_LEN>().ok_or(Error::BufferTooSmall)?;
        let (ip, h) = h.split_first_chunk_mut::<IP_LEN>().ok_or(Error::BufferTooSmall)?;
        let (udp_h, mn) = h.split_first_chunk_mut::<UDP_LEN>().ok_or(Error::BufferTooSmall)?;
        EthernetRepr { src_addr: self.src_mac, dst_addr: self.dst_mac, ethertype: EtherType::Ipv4 }.emit_header(eth);
        let ip_repr = Ipv4Repr {
            src_addr: self.src_ip,
            dst_addr: self.dst_ip,
            protocol: IpProtocol::Udp,
            payload_len: usize::from(udp_len),
            ttl: TTL,
        };
        ip_repr.emit_header(ip, caps)?;
        UdpRepr { src_port: self.src_port, dst_port: self.dst_port }.emit_header(udp_h, udp_len);
        self.hdr.emit(mn)?;
        if caps.udp.tx() {
            // The pseudo-header, the UDP and Machnet headers summed from their values (not read
            // back from the bytes just written: `checksum::term`), then the payload.
            use super::checksum::term;
            let ([l0, l1], [s0, s1], [d0, d1]) =
                (udp_len.to_be_bytes(), self.src_port.to_be_bytes(), self.dst_port.to_be_bytes());
            let terms = term(self.src_ip.octets())
                + term(self.dst_ip.octets())
                + term([0, u8::from(IpProtocol::Udp), l0, l1])
                + term([s0, s1, d0, d1])
                + term([l0, l1, 0, 0])
                + self.hdr.checksum_terms();
            let sum = super::checksum::with_terms(terms, &buf[FRAME_HEADER_LEN..]);
            UdpPacket::new_unchecked(&mut buf[ETH_LEN + IP_LEN..]).set_checksum_of(sum);
        } else {
            UdpPacket::new_unchecked(&mut buf[ETH_LEN + IP_LEN..]).fill_pseudo_checksum(self.src_ip, self.dst_ip);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Checksum, MsgFlags, PacketType, SackBitmap};

    /// Valid Machnet frames of several kinds and sizes (software checksums, and one with a zero
    /// UDP checksum).
    fn frames() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let base = FrameRepr {
            src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(198, 18, 0, 1),
            dst_ip: Ipv4Addr::new(198, 18, 0, 2),
            src_port: 1024,
            dst_port: 888,
            hdr: MachnetRepr::data(7, MsgFlags::FIRST | MsgFlags::LAST, 12345),
        };
        let mut ack = base;
        ack.hdr = MachnetRepr {
            sack: SackBitmap([1, 2, 3, 0x8000_0000_0000_0000]),
            sack_count: 4,
            ..MachnetRepr::control(PacketType::Ack, 9, 10)
        };
        for (repr, len) in [(base, 1usize), (base, 64), (base, 1000), (ack, 0)] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut buf = vec![0u8; FRAME_HEADER_LEN + len];
            let n = repr.emit_with_payload(&mut buf, &payload, ChecksumCaps::software()).unwrap();
            buf.truncate(n);
            out.push(buf);
        }
        let mut zero = out[1].clone();
        zero[ETH_LEN + IP_LEN + 6] = 0;
        zero[ETH_LEN + IP_LEN + 7] = 0;
        out.push(zero);
        // Ethernet padding after the IPv4 total length.
        let mut padded = out[0].clone();
        padded.extend_from_slice(&[0; 20]);
        out.push(padded);
        out
    }

    /// The fast path returns a frame only where the layered parse returns the same one, and for
    /// every Machnet frame with a 20-byte IPv4 header the layered parse accepts.
    fn agree(buf: &[u8]) {
        for caps in [ChecksumCaps::software(), ChecksumCaps::tx_only()] {
            let fast = machnet_fast(buf, caps);
            let layered = classify_layered(buf, caps);
            match (fast, layered) {
                (Some(f), Ok(Frame::Machnet(l))) => assert_eq!(f, l),
                (Some(f), other) => panic!("fast path accepted {f:?}, layered parse: {other:?}"),
                (None, Ok(Frame::Machnet(l))) if buf.get(ETH_LEN) == Some(&0x45) => {
                    panic!("fast path refused what the layered parse accepts: {l:?}")
                }
                (None, _) => {}
            }
            assert_eq!(classify(buf, caps), classify_layered(buf, caps));
        }
    }

    /// The frame as each layer's own `emit` writes it.
    fn emit_layered(r: &FrameRepr, buf: &mut [u8], payload_len: usize, caps: ChecksumCaps) -> usize {
        let len = FRAME_HEADER_LEN + payload_len;
        let buf = &mut buf[..len];
        EthernetRepr { src_addr: r.src_mac, dst_addr: r.dst_mac, ethertype: EtherType::Ipv4 }.emit(buf).unwrap();
        let udp_len = UDP_LEN + MN_LEN + payload_len;
        let ip = Ipv4Repr {
            src_addr: r.src_ip,
            dst_addr: r.dst_ip,
            protocol: IpProtocol::Udp,
            payload_len: udp_len,
            ttl: TTL,
        };
        ip.emit(&mut buf[ETH_LEN..], caps).unwrap();
        let l4 = &mut buf[ETH_LEN + IP_LEN..];
        r.hdr.emit(&mut l4[UDP_LEN..]).unwrap();
        let udp = UdpRepr { src_port: r.src_port, dst_port: r.dst_port };
        udp.emit(l4, r.src_ip, r.dst_ip, MN_LEN + payload_len, caps).unwrap();
        len
    }

    #[test]
    fn the_frame_emit_writes_what_the_layers_write() {
        let offload = ChecksumCaps { ipv4: Checksum::None, udp: Checksum::None, icmp: Checksum::None };
        for f in frames() {
            let Frame::Machnet(m) = classify(&f, ChecksumCaps::software()).unwrap() else { panic!("not Machnet") };
            let r = m.repr();
            for caps in [ChecksumCaps::software(), ChecksumCaps::tx_only(), offload] {
                for len in [0, 1, 63, m.payload.len()] {
                    let mut a: Vec<u8> = (0..FRAME_HEADER_LEN + len + 8).map(|i| (i * 13 + 5) as u8).collect();
                    let mut b = a.clone();
                    assert_eq!(r.emit(&mut a, len, caps), Ok(FRAME_HEADER_LEN + len));
                    emit_layered(&r, &mut b, len, caps);
                    assert_eq!(a, b, "caps {caps:?}, payload {len}");
                }
            }
            let mut small = vec![0u8; FRAME_HEADER_LEN + 9];
            assert_eq!(r.emit(&mut small, 10, ChecksumCaps::software()), Err(Error::BufferTooSmall));
            let mut big = vec![0u8; 70_000];
            assert_eq!(r.emit(&mut big, 65_536 - 82, ChecksumCaps::software()), Err(Error::BufferTooSmall));
            assert!(r.emit(&mut big, 65_535 - 82, ChecksumCaps::software()).is_ok());
        }
    }

    /// The checksums `emit` sums from the header values are the sums of the bytes it wrote,
    /// for random values in every header field (every bit of each word, the zero-checksum
    /// case among them) and payloads of every length up to 300 bytes (odd ones included).
    #[test]
    fn checksums_summed_from_the_values_are_those_of_the_bytes() {
        let mut next = super::super::xorshift(0x0bad_cafe_f00d_d00d);
        let types = [PacketType::Syn, PacketType::SynAck, PacketType::Ack, PacketType::Rst, PacketType::Data];
        for len in 0..=300usize {
            for _ in 0..20 {
                let r = next();
                let repr = FrameRepr {
                    src_mac: EthernetAddress([2, 0, 0, 0, 0, r as u8]),
                    dst_mac: EthernetAddress([2, 0, 0, 0, 1, (r >> 8) as u8]),
                    src_ip: Ipv4Addr::from((r >> 32) as u32),
                    dst_ip: Ipv4Addr::from(next() as u32),
                    src_port: next() as u16,
                    dst_port: next() as u16,
                    hdr: MachnetRepr {
                        packet_type: types[(next() % 5) as usize],
                        msg_flags: MsgFlags::from_bits_retain(next() as u8),
                        seqno: next() as u32,
                        ackno: next() as u32,
                        sack: SackBitmap([next(), next() >> (next() % 64), 0, next()]),
                        sack_count: next() as u16,
                        timestamp: next(),
                    },
                };
                let mut buf: Vec<u8> = (0..FRAME_HEADER_LEN + len).map(|_| next() as u8).collect();
                assert_eq!(repr.emit(&mut buf, len, ChecksumCaps::software()), Ok(FRAME_HEADER_LEN + len));
                assert_eq!(super::super::checksum::data(&buf[ETH_LEN..ETH_LEN + IP_LEN]), 0xffff, "IPv4 header");
                let udp = &buf[ETH_LEN + IP_LEN..];
                let stored = u16::from_be_bytes([udp[6], udp[7]]);
                assert_ne!(stored, 0, "a computed zero goes out as all ones");
                let mut unset = udp.to_vec();
                unset[6..8].fill(0);
                let sum =
                    super::super::checksum::pseudo_and_data(repr.src_ip, repr.dst_ip, 17, udp.len() as u16, &unset);
                let expect = if sum == 0xffff { 0xffff } else { !sum };
                assert_eq!(stored, expect, "UDP checksum, payload {len}, {repr:?}");
            }
        }
        // A datagram whose sum is all ones (a computed checksum of zero) goes out with all
        // ones: one of the 65,536 sequence numbers gives it.
        let mut r = frames_repr();
        let mut buf = vec![0u8; FRAME_HEADER_LEN + 5];
        let found = (0..=u16::MAX).find(|&s| {
            r.hdr.seqno = u32::from(s);
            r.emit(&mut buf, 5, ChecksumCaps::software()).unwrap();
            let mut unset = buf[ETH_LEN + IP_LEN..].to_vec();
            unset[6..8].fill(0);
            super::super::checksum::pseudo_and_data(r.src_ip, r.dst_ip, 17, unset.len() as u16, &unset) == 0xffff
        });
        assert!(found.is_some(), "no sequence number gives a zero checksum");
        assert_eq!(&buf[ETH_LEN + IP_LEN + 6..ETH_LEN + IP_LEN + 8], &[0xff, 0xff]);
    }

    /// The first of [`frames`]'s headers.
    fn frames_repr() -> FrameRepr {
        let f = frames().swap_remove(0);
        let Frame::Machnet(m) = classify(&f, ChecksumCaps::software()).unwrap() else { panic!("not Machnet") };
        m.repr()
    }

    #[test]
    fn the_fast_path_and_the_layered_parse_agree() {
        for f in frames() {
            assert!(machnet_fast(&f, ChecksumCaps::software()).is_some(), "valid frame refused");
            agree(&f);
            for len in 0..f.len() {
                agree(&f[..len]);
            }
            // Every header byte damaged in several ways (checksums then fail, or lengths,
            // types, versions, fragments, magic change meaning).
            for at in 0..FRAME_HEADER_LEN.min(f.len()) {
                for v in [0x00, 0xff, 0x01, 0x45, 0x40, 0x11, 0x20, f[at] ^ 0x01, f[at] ^ 0x80] {
                    let mut g = f.clone();
                    g[at] = v;
                    agree(&g);
                }
            }
            // Length fields: every IPv4 total length and UDP length near the real ones.
            for field in [ETH_LEN + 2, ETH_LEN + IP_LEN + 4] {
                let real = u16::from_be_bytes([f[field], f[field + 1]]);
                for d in -70i32..=30 {
                    let mut g = f.clone();
                    let v = (i32::from(real) + d).clamp(0, 0xffff) as u16;
                    g[field..field + 2].copy_from_slice(&v.to_be_bytes());
                    agree(&g);
                }
            }
        }
    }
}
