//! Wire formats: typed views over byte slices and validated `Repr`s.
//!
//! Every header follows the same model (after smoltcp):
//!
//! * a view `Xxx<T: AsRef<[u8]>>` with `new_unchecked`, `check_len` and `new_checked`; after
//!   `new_checked` succeeds no accessor panics, whatever the bytes are;
//! * setters only where `T: AsMut<[u8]>`;
//! * a `Copy` `XxxRepr` whose `parse` is the only place that validates field values, and whose
//!   `emit` writes into a caller-provided buffer.
//!
//! Checksums are a parameter ([`ChecksumCaps`]): computed and verified in software, or left to a
//! device that offloads them. Missing offloads degrade to software; nothing here probes a device.
//!
//! [`classify`] parses a whole received frame in one pass (Ethernet → ARP | IPv4 → ICMP echo |
//! UDP → Machnet), and [`FrameRepr`] emits a whole Machnet frame.
#![forbid(unsafe_code)]

use core::fmt;

/// A xorshift64 stream from `seed` (non-zero), for the wire tests' random fields and data.
#[cfg(test)]
pub(crate) fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

mod arp;
pub mod checksum;
mod ethernet;
mod frame;
mod icmp;
mod ipv4;
mod machnet;
mod udp;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr};
pub use frame::{
    classify, classify_layered, emit_arp, Frame, FrameRepr, IcmpFrame, MachnetFrame, FRAME_HEADER_LEN, TTL,
};
pub use icmp::{IcmpEchoKind, IcmpEchoRepr, IcmpPacket};
pub use ipv4::{IpProtocol, Ipv4Packet, Ipv4Repr};
pub use machnet::{MachnetHeader, MachnetRepr, MsgFlags, PacketType, SackBitmap};
pub use udp::{UdpPacket, UdpRepr};

/// Header lengths and the payload size they leave in a standard 1500-byte MTU.
pub mod consts {
    /// Ethernet II header without FCS.
    pub const ETHERNET_HEADER_LEN: usize = 14;
    /// IPv4 header without options.
    pub const IPV4_HEADER_LEN: usize = 20;
    /// UDP header.
    pub const UDP_HEADER_LEN: usize = 8;
    /// Machnet header.
    pub const MACHNET_HEADER_LEN: usize = 54;
    /// ARP packet for IPv4 over Ethernet.
    pub const ARP_LEN: usize = 28;
    /// The standard Ethernet MTU the original forces on its port.
    pub const DEFAULT_MTU: usize = 1500;
    /// Bytes of headers above Ethernet in a Machnet packet (IPv4 + UDP + Machnet).
    pub const L3_OVERHEAD: usize = IPV4_HEADER_LEN + UDP_HEADER_LEN + MACHNET_HEADER_LEN;
    /// Maximum Machnet payload per packet at an MTU of 1500: 1418 bytes.
    pub const DEFAULT_MSS: usize = DEFAULT_MTU - L3_OVERHEAD;
    /// Maximum Machnet payload for a given MTU.
    pub const fn mss_for_mtu(mtu: usize) -> usize {
        mtu.saturating_sub(L3_OVERHEAD)
    }
    static_assertions::const_assert_eq!(DEFAULT_MSS, 1418);
}

/// Why a buffer could not be parsed or emitted. Small, `Copy`, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer is shorter than the header, or than a length field says.
    Truncated,
    /// A field has a value the format does not allow (version, header length, length fields).
    Malformed,
    /// A checksum does not verify.
    Checksum,
    /// An IPv4 fragment: Machnet never fragments, so fragments are refused.
    Fragmented,
    /// Well-formed but not something this stack handles (EtherType, protocol, ARP kind, ICMP type).
    Unsupported,
    /// A UDP payload that does not start with the Machnet magic 0x4E53.
    BadMagic,
    /// The output buffer is too small for what `emit` was asked to write.
    BufferTooSmall,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated packet",
            Error::Malformed => "malformed packet",
            Error::Checksum => "checksum mismatch",
            Error::Fragmented => "IPv4 fragment",
            Error::Unsupported => "unsupported packet",
            Error::BadMagic => "not a Machnet packet (bad magic)",
            Error::BufferTooSmall => "buffer too small",
        })
    }
}

impl core::error::Error for Error {}

/// Result of parsing or emitting.
pub type Result<T> = core::result::Result<T, Error>;

/// Where a checksum is handled: which directions software must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Software verifies on receive and computes on transmit.
    #[default]
    Both,
    /// Software verifies on receive; the device computes on transmit.
    Rx,
    /// Software computes on transmit; the device verified on receive (or nobody checks).
    Tx,
    /// The device does both.
    None,
}

impl Checksum {
    /// Software must verify received checksums.
    #[inline]
    pub fn rx(self) -> bool {
        matches!(self, Checksum::Both | Checksum::Rx)
    }
    /// Software must compute transmitted checksums.
    #[inline]
    pub fn tx(self) -> bool {
        matches!(self, Checksum::Both | Checksum::Tx)
    }
}

/// Checksum handling per protocol.
///
/// When the UDP transmit checksum is offloaded (`udp.tx() == false`), `emit` writes the
/// pseudo-header sum into the checksum field, which is what DPDK's offload contract requires
/// (the original Machnet wrote zero there, which breaks the offload on several NICs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChecksumCaps {
    /// IPv4 header checksum.
    pub ipv4: Checksum,
    /// UDP checksum (with the IPv4 pseudo-header).
    pub udp: Checksum,
    /// ICMP checksum.
    pub icmp: Checksum,
}

impl ChecksumCaps {
    /// Everything computed and verified in software.
    pub const fn software() -> Self {
        ChecksumCaps { ipv4: Checksum::Both, udp: Checksum::Both, icmp: Checksum::Both }
    }

    /// Nothing verified on receive (the device did it or the user opted out); computed on
    /// transmit in software.
    pub const fn tx_only() -> Self {
        ChecksumCaps { ipv4: Checksum::Tx, udp: Checksum::Tx, icmp: Checksum::Tx }
    }

    /// The same capabilities with receive verification switched off (used per packet when the
    /// device reports that it verified the checksums already).
    pub const fn without_rx(self) -> Self {
        const fn strip(c: Checksum) -> Checksum {
            match c {
                Checksum::Both | Checksum::Tx => Checksum::Tx,
                Checksum::Rx | Checksum::None => Checksum::None,
            }
        }
        ChecksumCaps { ipv4: strip(self.ipv4), udp: strip(self.udp), icmp: strip(self.icmp) }
    }
}

/// Big-endian field access on byte slices. Callers check lengths first.
pub(crate) mod field {
    pub type Field = core::ops::Range<usize>;

    #[inline(always)]
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }
    #[inline(always)]
    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    #[inline(always)]
    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(w)
    }
    #[inline(always)]
    pub fn set_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    #[inline(always)]
    pub fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    #[inline(always)]
    pub fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}
