//! The Machnet transport header: 54 bytes, every multi-byte field big-endian.
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 2 | magic 0x4E53 ("NS") |
//! | 2 | 1 | packet type (`net_flags`): DATA 0x00, SYN 0x01, ACK 0x02, SYN-ACK 0x03, RST 0x80 |
//! | 3 | 1 | message flags (`msg_flags`), DATA only: FIRST 0x01, MORE 0x02, LAST 0x04, CHAIN 0x08, NOTIFY_DELIVERY 0x80 |
//! | 4 | 4 | seqno |
//! | 8 | 4 | ackno |
//! | 12 | 32 | SACK bitmap, four u64 words |
//! | 44 | 2 | SACK count |
//! | 46 | 8 | timestamp |
//!
//! # SACK bit order
//!
//! The four words form one big-endian 256-bit integer whose least significant bit is distance
//! 0: the bit for packet `ackno + i` (0 ≤ i < 256) is bit `i % 64` of word `3 − i / 64`, where
//! word 0 is the first on the wire. This is the layout the original's sender reads (spec §6.4);
//! the original's receiver writes a different, broken layout, so SACK words from an original
//! peer must not be trusted (its `sack_count` is consistent and may be).

use super::field::{set_u16, set_u32, set_u64, u16_at, u32_at, u64_at};
use super::{Error, Result};
use bitflags::bitflags;

mod field {
    pub const MAGIC: usize = 0;
    pub const NET_FLAGS: usize = 2;
    pub const MSG_FLAGS: usize = 3;
    pub const SEQNO: usize = 4;
    pub const ACKNO: usize = 8;
    pub const SACK: usize = 12;
    pub const SACK_COUNT: usize = 44;
    pub const TIMESTAMP: usize = 46;
    pub const END: usize = 54;
}

/// Length of the Machnet header.
pub const HEADER_LEN: usize = 54;
/// The magic number at offset 0.
pub const MAGIC: u16 = 0x4E53;
static_assertions::const_assert_eq!(field::END, HEADER_LEN);
static_assertions::const_assert_eq!(field::TIMESTAMP + 8, HEADER_LEN);
static_assertions::const_assert_eq!(field::SACK + 32, field::SACK_COUNT);

/// The packet type (`net_flags`). Receivers match exact values, as the original does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// 0x00: carries one message fragment.
    Data,
    /// 0x01: connection request.
    Syn,
    /// 0x02: pure acknowledgement.
    Ack,
    /// 0x03: connection accept.
    SynAck,
    /// 0x80: reset.
    Rst,
    /// Any other value (ignored by receivers).
    Unknown(u8),
}

impl From<u8> for PacketType {
    fn from(v: u8) -> Self {
        match v {
            0x00 => PacketType::Data,
            0x01 => PacketType::Syn,
            0x02 => PacketType::Ack,
            0x03 => PacketType::SynAck,
            0x80 => PacketType::Rst,
            o => PacketType::Unknown(o),
        }
    }
}

impl From<PacketType> for u8 {
    fn from(v: PacketType) -> u8 {
        match v {
            PacketType::Data => 0x00,
            PacketType::Syn => 0x01,
            PacketType::Ack => 0x02,
            PacketType::SynAck => 0x03,
            PacketType::Rst => 0x80,
            PacketType::Unknown(o) => o,
        }
    }
}

bitflags! {
    /// Message fragment flags of a DATA packet (the original's MsgBuf flags byte).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MsgFlags: u8 {
        /// 0x01 (`SYN` in the original): first fragment of a message.
        const FIRST = 0x01;
        /// 0x02 (`SG`): more fragments of this message follow.
        const MORE = 0x02;
        /// 0x04 (`FIN`): last fragment of a message.
        const LAST = 0x04;
        /// 0x08 (`CHAIN`): engine-internal in the original; may leak onto the wire; ignored.
        const CHAIN = 0x08;
        /// 0x80: delivery notification requested (carried, not acted on).
        const NOTIFY_DELIVERY = 0x80;
        /// 0x40, in SYN and SYN-ACK only (machnet-rs): the sender reads acknowledgements
        /// carried in DATA. Set in both, the flow's DATA carries `ackno`, the SACK words and
        /// count, and a split timestamp ([`MachnetRepr::split_timestamp`]). The original writes
        /// 0 in a control packet's flags and never reads them, so it neither offers nor sees it.
        const ACKS_IN_DATA = 0x40;
    }
}

impl MsgFlags {
    /// Flags of fragment `index` of a message of `count` fragments (`count >= 1`).
    #[inline]
    pub fn for_fragment(index: usize, count: usize) -> MsgFlags {
        let mut f = MsgFlags::empty();
        if index == 0 {
            f |= MsgFlags::FIRST;
        }
        if index + 1 == count {
            f |= MsgFlags::LAST;
        } else {
            f |= MsgFlags::MORE;
        }
        f
    }
}

/// The 256-bit selective-acknowledgement bitmap; see the module docs for the bit order.
/// `self.0[0]` is the first word on the wire (the most significant).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SackBitmap(pub [u64; 4]);

impl SackBitmap {
    /// Number of distances the bitmap covers.
    pub const BITS: usize = 256;

    /// An empty bitmap.
    pub const fn new() -> Self {
        SackBitmap([0; 4])
    }
    #[inline]
    fn pos(dist: usize) -> (usize, u64) {
        (3 - dist / 64, 1u64 << (dist % 64))
    }
    /// True if distance `dist` is marked. Distances ≥ 256 are never marked.
    #[inline]
    pub fn get(&self, dist: usize) -> bool {
        if dist >= Self::BITS {
            return false;
        }
        let (w, m) = Self::pos(dist);
        self.0[w] & m != 0
    }
    /// Marks distance `dist` (ignored if ≥ 256).
    #[inline]
    pub fn set(&mut self, dist: usize) {
        if dist < Self::BITS {
            let (w, m) = Self::pos(dist);
            self.0[w] |= m;
        }
    }
    /// Clears distance `dist`.
    #[inline]
    pub fn clear(&mut self, dist: usize) {
        if dist < Self::BITS {
            let (w, m) = Self::pos(dist);
            self.0[w] &= !m;
        }
    }
    /// Number of marked distances.
    #[inline]
    pub fn count(&self) -> u32 {
        // Empty in the common case; `count_ones` is a table-free bit-twiddling sequence of about
        // ten instructions per word on x86-64 builds without POPCNT.
        if self.is_empty() {
            return 0;
        }
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// True if nothing is marked.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
    /// Highest marked distance, if any.
    pub fn highest(&self) -> Option<usize> {
        for (i, w) in self.0.iter().enumerate() {
            if *w != 0 {
                return Some((3 - i) * 64 + 63 - w.leading_zeros() as usize);
            }
        }
        None
    }
    /// Drops the `n` lowest distances: what was distance `d` becomes `d − n` (a right shift of
    /// the 256-bit integer).
    pub fn shift_down(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if n >= Self::BITS {
            *self = SackBitmap::new();
            return;
        }
        // Little-endian word order: le[0] holds distances 0..64.
        let le = [self.0[3], self.0[2], self.0[1], self.0[0]];
        let (words, bits) = (n / 64, n % 64);
        let mut out = [0u64; 4];
        for (i, o) in out.iter_mut().enumerate() {
            let src = i + words;
            if src < 4 {
                let mut v = le[src] >> bits;
                if bits != 0 && src + 1 < 4 {
                    v |= le[src + 1] << (64 - bits);
                }
                *o = v;
            }
        }
        self.0 = [out[3], out[2], out[1], out[0]];
    }
    /// Iterates over marked distances in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..4).flat_map(move |le_idx| {
            let mut w = self.0[3 - le_idx];
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(le_idx * 64 + b)
            })
        })
    }
}

impl core::fmt::Debug for SackBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Sack[{:016x} {:016x} {:016x} {:016x}]", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// A view of a Machnet header (and what follows it).
#[derive(Debug, Clone)]
pub struct MachnetHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> MachnetHeader<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        MachnetHeader { buffer }
    }
    /// Wraps a buffer after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }
    /// `Err(Truncated)` below 54 bytes.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    /// Magic field.
    #[inline]
    pub fn magic(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::MAGIC)
    }
    /// Packet type.
    #[inline]
    pub fn packet_type(&self) -> PacketType {
        self.buffer.as_ref()[field::NET_FLAGS].into()
    }
    /// Message flags (unknown bits retained).
    #[inline]
    pub fn msg_flags(&self) -> MsgFlags {
        MsgFlags::from_bits_retain(self.buffer.as_ref()[field::MSG_FLAGS])
    }
    /// Sequence number.
    #[inline]
    pub fn seqno(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::SEQNO)
    }
    /// Acknowledgement number.
    #[inline]
    pub fn ackno(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::ACKNO)
    }
    /// SACK bitmap.
    #[inline]
    pub fn sack(&self) -> SackBitmap {
        let b = self.buffer.as_ref();
        SackBitmap([
            u64_at(b, field::SACK),
            u64_at(b, field::SACK + 8),
            u64_at(b, field::SACK + 16),
            u64_at(b, field::SACK + 24),
        ])
    }
    /// SACK count.
    #[inline]
    pub fn sack_count(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::SACK_COUNT)
    }
    /// Timestamp.
    #[inline]
    pub fn timestamp(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::TIMESTAMP)
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> MachnetHeader<&'a T> {
    /// Bytes after the header.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

/// A validated Machnet header.
///
/// Field rules of the original (spec §4.2, §6): DATA packets carry `ackno = 0xFFFFFFFF`
/// ([`MachnetRepr::DATA_ACKNO`]); pure ACKs carry `seqno = snd_nxt`, `ackno = rcv_nxt`, the SACK
/// words and count. Unused fields are zero. `timestamp` is ours: a DATA packet carries the
/// sender's clock, an ACK echoes the timestamp of the packet that triggered it; original peers
/// write 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachnetRepr {
    /// Packet type.
    pub packet_type: PacketType,
    /// Fragment flags (DATA only).
    pub msg_flags: MsgFlags,
    /// Sequence number.
    pub seqno: u32,
    /// Acknowledgement number.
    pub ackno: u32,
    /// SACK bitmap.
    pub sack: SackBitmap,
    /// SACK count: packets held above `ackno`.
    pub sack_count: u16,
    /// Timestamp (see type docs).
    pub timestamp: u64,
}

impl MachnetRepr {
    /// The `ackno` a DATA packet carries.
    pub const DATA_ACKNO: u32 = 0xFFFF_FFFF;

    /// A control packet (SYN, SYN-ACK, ACK, RST) with empty SACK information.
    pub const fn control(packet_type: PacketType, seqno: u32, ackno: u32) -> Self {
        MachnetRepr {
            packet_type,
            msg_flags: MsgFlags::empty(),
            seqno,
            ackno,
            sack: SackBitmap([0; 4]),
            sack_count: 0,
            timestamp: 0,
        }
    }

    /// A DATA packet.
    pub const fn data(seqno: u32, msg_flags: MsgFlags, timestamp: u64) -> Self {
        MachnetRepr {
            packet_type: PacketType::Data,
            msg_flags,
            seqno,
            ackno: Self::DATA_ACKNO,
            sack: SackBitmap([0; 4]),
            sack_count: 0,
            timestamp,
        }
    }

    /// The timestamp of a DATA packet of a flow that carries acknowledgements in DATA: the
    /// sender's clock (low 32 bits of ns, never 0) in the high half, and in the low half the
    /// echo of the peer's (32-bit) timestamp plus the time it was held, or 0 for none. ACKs of
    /// such a flow carry the 32-bit echo in the low half.
    #[inline]
    pub const fn split_timestamp(sent: u64, echo: u32) -> u64 {
        let s = sent as u32;
        let s = if s == 0 { 1 } else { s };
        ((s as u64) << 32) | echo as u64
    }

    /// The two halves of a [`split_timestamp`](Self::split_timestamp): (sent, echo).
    #[inline]
    pub const fn unsplit_timestamp(ts: u64) -> (u32, u32) {
        ((ts >> 32) as u32, ts as u32)
    }

    /// Validates the header: length and magic. Unknown packet types parse (as
    /// [`PacketType::Unknown`]) so the caller can count and ignore them.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(h: &MachnetHeader<&T>) -> Result<Self> {
        h.check_len()?;
        if h.magic() != MAGIC {
            return Err(Error::BadMagic);
        }
        Ok(MachnetRepr {
            packet_type: h.packet_type(),
            msg_flags: h.msg_flags(),
            seqno: h.seqno(),
            ackno: h.ackno(),
            sack: h.sack(),
            sack_count: h.sack_count(),
            timestamp: h.timestamp(),
        })
    }

    /// 54.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// The machine-order checksum terms of the 54 bytes [`emit`](Self::emit) writes, from the
    /// values (`checksum::term`); the header must sit at an even offset of the datagram, as it
    /// does behind a UDP header.
    #[inline]
    pub fn checksum_terms(&self) -> u64 {
        use super::checksum::term;
        let [m0, m1] = MAGIC.to_be_bytes();
        let mut sum = term([m0, m1, self.packet_type.into(), self.msg_flags.bits()])
            + term(self.seqno.to_be_bytes())
            + term(self.ackno.to_be_bytes());
        for w in self.sack.0 {
            let [a, b, c, d, e, f, g, h] = w.to_be_bytes();
            sum += term([a, b, c, d]) + term([e, f, g, h]);
        }
        let [c0, c1] = self.sack_count.to_be_bytes();
        let [t0, t1, t2, t3, t4, t5, t6, t7] = self.timestamp.to_be_bytes();
        sum + term([c0, c1, t0, t1]) + term([t2, t3, t4, t5]) + term([t6, t7, 0, 0])
    }

    /// Writes the 54-byte header into `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if buf.len() < HEADER_LEN {
            return Err(Error::BufferTooSmall);
        }
        set_u16(buf, field::MAGIC, MAGIC);
        buf[field::NET_FLAGS] = self.packet_type.into();
        buf[field::MSG_FLAGS] = self.msg_flags.bits();
        set_u32(buf, field::SEQNO, self.seqno);
        set_u32(buf, field::ACKNO, self.ackno);
        for (i, w) in self.sack.0.iter().enumerate() {
            set_u64(buf, field::SACK + 8 * i, *w);
        }
        set_u16(buf, field::SACK_COUNT, self.sack_count);
        set_u64(buf, field::TIMESTAMP, self.timestamp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sack_bit_layout_is_big_endian_256() {
        let mut s = SackBitmap::new();
        s.set(0);
        assert_eq!(s.0, [0, 0, 0, 1]);
        s.set(63);
        s.set(64);
        s.set(255);
        assert_eq!(s.0, [1 << 63, 0, 1, 1 | 1 << 63]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 255]);
        assert_eq!(s.highest(), Some(255));
        assert_eq!(s.count(), 4);
        s.set(256); // out of range: ignored
        assert!(!s.get(256));
        assert_eq!(s.count(), 4);
    }

    #[test]
    fn shift_down_matches_model() {
        let dists = [0usize, 1, 5, 63, 64, 65, 127, 128, 200, 255];
        for n in [0usize, 1, 2, 63, 64, 65, 100, 128, 191, 255, 256, 300] {
            let mut s = SackBitmap::new();
            for d in dists {
                s.set(d);
            }
            s.shift_down(n);
            let expect: Vec<usize> = dists.iter().filter(|&&d| d >= n).map(|&d| d - n).collect();
            assert_eq!(s.iter().collect::<Vec<_>>(), expect, "shift {n}");
        }
    }

    #[test]
    fn flags_for_fragments() {
        assert_eq!(MsgFlags::for_fragment(0, 1), MsgFlags::FIRST | MsgFlags::LAST);
        assert_eq!(MsgFlags::for_fragment(0, 3), MsgFlags::FIRST | MsgFlags::MORE);
        assert_eq!(MsgFlags::for_fragment(1, 3), MsgFlags::MORE);
        assert_eq!(MsgFlags::for_fragment(2, 3), MsgFlags::LAST);
        assert_eq!((MsgFlags::FIRST | MsgFlags::LAST).bits(), 0x05);
    }

    #[test]
    fn magic_and_unknown_types() {
        let mut b = [0u8; 54];
        MachnetRepr::control(PacketType::Unknown(0x42), 1, 2).emit(&mut b).unwrap();
        let r = MachnetRepr::parse(&MachnetHeader::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(r.packet_type, PacketType::Unknown(0x42));
        b[0] = 0x4f;
        assert_eq!(MachnetRepr::parse(&MachnetHeader::new_unchecked(&b[..])), Err(Error::BadMagic));
        assert_eq!(MachnetHeader::new_checked(&b[..53]).unwrap_err(), Error::Truncated);
    }
}
