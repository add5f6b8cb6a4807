//! Packet capture: the frames a shard receives from and sends to its port queue, copied into a
//! bounded ring that the controller drains into pcapng for `machnetctl capture`.
//!
//! The controller makes one [`Tap`] per shard and keeps its [`Reader`]. The records (a fixed
//! number, each with room for `snaplen` bytes) are allocated up front and cycle between two
//! single-producer single-consumer rings: the reader hands empty ones to the tap, the tap hands
//! them back filled. A shard with no empty record drops the capture of that frame (counted);
//! traffic is never held up by a slow reader. With no capture running the shard pays one
//! branch per receive burst and one per transmit flush (`Option::is_some` on its tap).
//!
//! Timestamps are the shard's clock (the loop time of the receive burst, and for transmitted
//! frames the latest loop time), moved to wall-clock time by the offset between the two at the
//! start of the capture.

use machnet_net::time::Instant;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Records per shard.
pub const RECORDS: usize = 4096;
/// Most packets one read of a capture returns (about 9 MiB of pcapng at the largest snapshot);
/// a reader that gets this many reads again at once.
pub const READ_MAX: usize = 1024;
/// Largest snapshot length (a whole frame of the largest MTU the backends take, 9000 + 14).
pub const MAX_SNAPLEN: usize = 9216;

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Received from the port.
    In,
    /// Sent to the port.
    Out,
}

/// One captured frame.
#[derive(Debug)]
pub struct Record {
    /// Shard clock, ns.
    pub at_ns: u64,
    /// Length of the frame on the wire.
    pub orig_len: u32,
    /// Bytes kept in `data`.
    pub len: u32,
    /// Direction.
    pub dir: Dir,
    /// `snaplen` bytes of room.
    pub data: Box<[u8]>,
}

/// Which frames a capture keeps. Empty: every frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// IPv4 frames from or to this address.
    pub ip: Option<Ipv4Addr>,
    /// UDP frames from or to this port.
    pub port: Option<u16>,
    /// One flow: (local port, remote IP, remote port), in either direction.
    pub flow: Option<(u16, Ipv4Addr, u16)>,
}

impl Filter {
    /// True if `frame` passes. Non-IPv4 frames (ARP) pass only an empty filter.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        if self.ip.is_none() && self.port.is_none() && self.flow.is_none() {
            return true;
        }
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return false;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let ip_at = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
        let (src, dst) = (ip_at(26), ip_at(30));
        if self.ip.is_some_and(|ip| ip != src && ip != dst) {
            return false;
        }
        if self.port.is_none() && self.flow.is_none() {
            return true;
        }
        let l4 = 14 + ihl;
        if frame[23] != 17 || ihl < 20 || frame.len() < l4 + 8 {
            return false;
        }
        let sport = u16::from_be_bytes([frame[l4], frame[l4 + 1]]);
        let dport = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
        if self.port.is_some_and(|p| p != sport && p != dport) {
            return false;
        }
        match self.flow {
            None => true,
            Some((lp, rip, rp)) => {
                (sport == lp && dst == rip && dport == rp) || (dport == lp && src == rip && sport == rp)
            }
        }
    }
}

/// The filter and snapshot length as a `CAPTURE_START` request carries them (bytes 40..64 of
/// the control message): snaplen u16 LE (0: [`MAX_SNAPLEN`]), a flags byte (1 ip, 2 port,
/// 4 flow), a zero byte, then ip (4, network order), port (u16 LE), the flow's local port
/// (u16 LE), remote IP (4) and remote port (u16 LE).
pub fn encode_args(filter: &Filter, snaplen: usize) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[0..2].copy_from_slice(&(snaplen.min(MAX_SNAPLEN) as u16).to_le_bytes());
    if let Some(ip) = filter.ip {
        a[2] |= 1;
        a[4..8].copy_from_slice(&ip.octets());
    }
    if let Some(p) = filter.port {
        a[2] |= 2;
        a[8..10].copy_from_slice(&p.to_le_bytes());
    }
    if let Some((lp, rip, rp)) = filter.flow {
        a[2] |= 4;
        a[10..12].copy_from_slice(&lp.to_le_bytes());
        a[12..16].copy_from_slice(&rip.octets());
        a[16..18].copy_from_slice(&rp.to_le_bytes());
    }
    a
}

/// The inverse of [`encode_args`]; `None` for unknown flag bits.
pub fn decode_args(a: &[u8; 24]) -> Option<(Filter, usize)> {
    if a[2] & !7 != 0 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([a[o], a[o + 1]]);
    let ip_at = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
    let snaplen = match u16_at(0) {
        0 => MAX_SNAPLEN,
        n => usize::from(n),
    };
    let filter = Filter {
        ip: (a[2] & 1 != 0).then(|| ip_at(4)),
        port: (a[2] & 2 != 0).then(|| u16_at(8)),
        flow: (a[2] & 4 != 0).then(|| (u16_at(10), ip_at(12), u16_at(16))),
    };
    Some((filter, snaplen))
}

/// A shard's end of a capture.
pub struct Tap {
    filter: Filter,
    snaplen: usize,
    empty: rtrb::Consumer<Box<Record>>,
    filled: rtrb::Producer<Box<Record>>,
    dropped: Arc<AtomicU64>,
    /// The shard's latest loop time (stamps transmitted frames).
    pub now: Instant,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("filter", &self.filter).field("snaplen", &self.snaplen).finish_non_exhaustive()
    }
}

impl Tap {
    /// Captures `frame` if it passes the filter and an empty record is at hand.
    #[inline]
    pub fn frame(&mut self, dir: Dir, at: Instant, frame: &[u8]) {
        if !self.filter.matches(frame) {
            return;
        }
        let Ok(mut r) = self.empty.pop() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let n = frame.len().min(self.snaplen).min(r.data.len());
        r.data[..n].copy_from_slice(&frame[..n]);
        r.len = n as u32;
        r.orig_len = frame.len() as u32;
        r.at_ns = at.as_nanos();
        r.dir = dir;
        // The rings hold every record, so there is always room for one taken from `empty`.
        if let Err(rtrb::PushError::Full(r)) = self.filled.push(r) {
            drop(r);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The controller's end of a shard's capture.
pub struct Reader {
    empty: rtrb::Producer<Box<Record>>,
    filled: rtrb::Consumer<Box<Record>>,
    dropped: Arc<AtomicU64>,
}

impl Reader {
    /// Frames the shard could not capture (no empty record) so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Calls `f` with each filled record, oldest first, up to `max`, and hands the records
    /// back to the tap. Returns how many.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&Record)) -> usize {
        let mut n = 0;
        while n < max {
            let Ok(r) = self.filled.pop() else { break };
            f(&r);
            n += 1;
            // Room: the records only cycle between the two rings.
            let _ = self.empty.push(r);
        }
        n
    }
}

/// A tap and its reader, with [`RECORDS`] records of `snaplen` bytes (clamped to
/// 1..=[`MAX_SNAPLEN`]).
pub fn tap(filter: Filter, snaplen: usize, now: Instant) -> (Tap, Reader) {
    let snaplen = snaplen.clamp(1, MAX_SNAPLEN);
    let (mut empty_p, empty_c) = rtrb::RingBuffer::new(RECORDS);
    let (filled_p, filled_c) = rtrb::RingBuffer::new(RECORDS);
    for _ in 0..RECORDS {
        let r =
            Box::new(Record { at_ns: 0, orig_len: 0, len: 0, dir: Dir::In, data: vec![0; snaplen].into_boxed_slice() });
        let _ = empty_p.push(r);
    }
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Tap { filter, snaplen, empty: empty_c, filled: filled_p, dropped: dropped.clone(), now },
        Reader { empty: empty_p, filled: filled_c, dropped },
    )
}

// --- pcapng -------------------------------------------------------------------------------

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + pad4(value.len()) - value.len(), 0);
}

fn block(out: &mut Vec<u8>, kind: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

/// A pcapng section header and one Ethernet interface per shard (`machnet shard N`, ns
/// timestamps, `snaplen`).
pub fn pcapng_header(shards: usize, snaplen: usize, hostname: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&u64::MAX.to_le_bytes()); // section length unknown
    option(&mut shb, 4, b"machnetd (machnet-rs)"); // shb_userappl
    if !hostname.is_empty() {
        option(&mut shb, 2, hostname.as_bytes()); // shb_hardware: where it ran
    }
    option(&mut shb, 0, &[]);
    block(&mut out, 0x0A0D_0D0A, &shb);
    for i in 0..shards {
        let mut idb = Vec::new();
        idb.extend_from_slice(&1u16.to_le_bytes()); // LINKTYPE_ETHERNET
        idb.extend_from_slice(&0u16.to_le_bytes());
        idb.extend_from_slice(&(snaplen as u32).to_le_bytes());
        option(&mut idb, 2, format!("machnet shard {i}").as_bytes()); // if_name
        option(&mut idb, 3, format!("machnetd shard {i}: its port queue {i}").as_bytes()); // if_description
        option(&mut idb, 9, &[9]); // if_tsresol: ns
        option(&mut idb, 0, &[]);
        block(&mut out, 1, &idb);
    }
    out
}

/// Appends an enhanced packet block for `r` captured on shard `iface`, its time moved to the
/// wall clock by `offset_ns`.
pub fn pcapng_packet(out: &mut Vec<u8>, iface: u32, r: &Record, offset_ns: i128) {
    let ts = (i128::from(r.at_ns) + offset_ns).max(0) as u64;
    let data = &r.data[..r.len as usize];
    let mut b = Vec::with_capacity(32 + pad4(data.len()) + 12);
    b.extend_from_slice(&iface.to_le_bytes());
    b.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&(ts as u32).to_le_bytes());
    b.extend_from_slice(&r.len.to_le_bytes());
    b.extend_from_slice(&r.orig_len.to_le_bytes());
    b.extend_from_slice(data);
    b.resize(b.len() + pad4(data.len()) - data.len(), 0);
    let flags: u32 = match r.dir {
        Dir::In => 1,
        Dir::Out => 2,
    };
    option(&mut b, 2, &flags.to_le_bytes()); // epb_flags: direction
    option(&mut b, 0, &[]);
    block(out, 6, &b);
}

/// The enhanced packet blocks in `blocks` (a sequence of whole pcapng blocks): the byte
/// length of the first `n` of them and how many there were up to that point.
pub fn first_packets(blocks: &[u8], n: usize) -> (usize, usize) {
    let (mut at, mut packets) = (0, 0);
    while at + 12 <= blocks.len() && packets < n {
        let kind = u32::from_le_bytes(blocks[at..at + 4].try_into().unwrap());
        let len = u32::from_le_bytes(blocks[at + 4..at + 8].try_into().unwrap()) as usize;
        if len < 12 || at + len > blocks.len() {
            break;
        }
        packets += usize::from(kind == 6);
        at += len;
    }
    (at, packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 96];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn filters() {
        let a = [198, 18, 0, 1];
        let b = [198, 18, 0, 2];
        let out = udp_frame(a, b, 1024, 888);
        let back = udp_frame(b, a, 888, 1024);
        let other = udp_frame(a, b, 1025, 888);
        let arp = {
            let mut f = vec![0u8; 60];
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f
        };
        assert!(Filter::default().matches(&arp));
        let ip = Filter { ip: Some(Ipv4Addr::from(b)), ..Filter::default() };
        assert!(ip.matches(&out) && ip.matches(&back) && !ip.matches(&arp));
        assert!(!Filter { ip: Some(Ipv4Addr::new(198, 18, 0, 9)), ..Filter::default() }.matches(&out));
        let port = Filter { port: Some(1024), ..Filter::default() };
        assert!(port.matches(&out) && port.matches(&back) && !port.matches(&other));
        let flow = Filter { flow: Some((1024, Ipv4Addr::from(b), 888)), ..Filter::default() };
        assert!(flow.matches(&out) && flow.matches(&back) && !flow.matches(&other));
        assert!(!flow.matches(&out[..30]), "short frames do not match");
    }

    #[test]
    fn arguments_round_trip() {
        let f = Filter {
            ip: Some(Ipv4Addr::new(198, 18, 0, 2)),
            port: Some(888),
            flow: Some((1024, Ipv4Addr::new(198, 18, 0, 9), 31580)),
        };
        assert_eq!(decode_args(&encode_args(&f, 128)), Some((f, 128)));
        assert_eq!(decode_args(&encode_args(&Filter::default(), 0)), Some((Filter::default(), MAX_SNAPLEN)));
        let mut bad = [0u8; 24];
        bad[2] = 8;
        assert_eq!(decode_args(&bad), None);
    }

    #[test]
    fn a_slow_reader_drops_captures_never_frames() {
        let (mut t, mut r) = tap(Filter::default(), 64, Instant::ZERO);
        let f = udp_frame([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
        for k in 0..RECORDS + 10 {
            t.frame(Dir::In, Instant::from_micros(k as u64), &f);
        }
        assert_eq!(r.dropped(), 10);
        let mut seen = 0;
        assert_eq!(
            r.drain(usize::MAX, |rec| {
                assert_eq!((rec.len, rec.orig_len), (64, 96), "cut to the snapshot length");
                assert_eq!(rec.at_ns, seen * 1000);
                seen += 1;
            }),
            RECORDS
        );
        t.frame(Dir::Out, Instant::ZERO, &f);
        assert_eq!(r.drain(usize::MAX, |rec| assert_eq!(rec.dir, Dir::Out)), 1, "records come back");
    }

    #[test]
    fn pcapng_blocks_are_whole_and_counted() {
        let mut out = pcapng_header(2, 128, "host");
        let header_len = out.len();
        assert_eq!(out.len() % 4, 0);
        let r = Record { at_ns: 5, orig_len: 97, len: 97, dir: Dir::In, data: vec![7; 97].into_boxed_slice() };
        let mut blocks = Vec::new();
        for _ in 0..3 {
            pcapng_packet(&mut blocks, 1, &r, 1_000_000_000);
        }
        assert_eq!(blocks.len() % 4, 0);
        let one = blocks.len() / 3;
        assert_eq!(first_packets(&blocks, 2), (2 * one, 2));
        assert_eq!(first_packets(&blocks, 9), (3 * one, 3));
        assert_eq!(first_packets(&out, 9).1, 0, "no packets in the header");
        out.extend_from_slice(&blocks);
        assert_eq!(first_packets(&out[header_len..], 1), (one, 1));
    }
}
