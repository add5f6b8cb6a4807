//! A frame fuzzer at the daemon's door (issue 14): both endpoints' receive paths take hostile
//! frames, generated from a seed, while two real flows (one opened by each side) carry messages
//! of many sizes both ways over a link that drops, reorders, duplicates and corrupts.
//!
//! The frames ([`Gen`]):
//!
//! * **garbage**: random bytes; random bytes behind a valid Ethernet header; a valid
//!   Ethernet/IPv4/UDP datagram around random bytes, with or without the Machnet magic;
//! * **random headers**: valid frames whose Machnet fields are all random (the type byte
//!   including unknown values, fragment flags, seqno and ackno, SACK words and count,
//!   timestamp, payload length from 0 past the MSS), to random, nearly right or exactly right
//!   4-tuples, from random addresses, the peer's or the endpoint's own;
//! * **truncations**: valid frames cut at every length, both raw (the IPv4 and UDP lengths still
//!   claim the whole frame) and consistent (lengths and checksums rewritten, so the Machnet layer
//!   sees every short header and payload);
//! * **edges**: frames on a real flow's own 4-tuple whose numbers sit around every boundary of
//!   its state, read from [`FlowInfo`] just before: ackno at `snd_una − 1`, `snd_una`,
//!   `snd_nxt`, `snd_nxt + 1`, a window off, half the sequence space off; DATA from
//!   `rcv_nxt − 1` down to `rcv_nxt − 257`, at `rcv_nxt + window` and above, far away; DATA in
//!   the window with an empty or oversized payload; RSTs just outside the window, and with
//!   seqno 0 at acknos that answer nothing in flight; SYNs and SYN-ACKs; SACK bitmaps and counts
//!   that contradict the ackno; timestamps of 0, now, the past and the future;
//! * **spoofed handshakes**: a SYN from a forged source, then what would complete the handshake
//!   without having seen the SYN-ACK: DATA at the forged ISN + 1, ACKs with guessed acknos.
//!
//! Two of the seeds start the real flows' sequence numbers just below 2³², so the edges and the
//! transfer cross the wrap.
//!
//! **Not generated**: Machnet, like TCP, does not authenticate its peer. A frame with a real
//! flow's 4-tuple *and* numbers that the peer itself could send is indistinguishable from the
//! peer's own: DATA in the receive window, an RST in the receive window or with seqno 0
//! acknowledging a packet in flight, an ACK for data the peer has not received yet (also
//! carried in DATA up to a window below the receive window, on flows with ACKs in DATA). An
//! attacker on the path who sees the flow can send those, and only cryptography would stop
//! it. [`peers_own`] filters such frames out, at the moment each frame is injected; everything
//! else must leave the real flows untouched.
//!
//! Checks, per seed: every real message arrives once, in order, intact (the simulation's
//! checkers); no panic; no event at all once the real flows are up (no flow reset, failed or
//! closed, no forged flow accepted, no message on a forged flow); and once the hostile traffic
//! stops and the handshake timeouts have passed (30 s of virtual time), each endpoint holds
//! exactly its two real flows, idle, and no half-open flow, timer or segment besides; the real
//! flows then still carry messages. Over all seeds, the endpoints' counters must show that
//! every kind of frame reached the code it aims at.

mod sim;

use machnet_net::wire::{
    classify, ChecksumCaps, EtherType, EthernetAddress, EthernetRepr, Frame, FrameRepr, IpProtocol, Ipv4Repr,
    MachnetRepr, MsgFlags, PacketType, SackBitmap, UdpRepr, FRAME_HEADER_LEN,
};
use machnet_transport::cc::CcConfig;
use machnet_transport::{seq, Config, EndpointStats, FlowId, FlowInfo, FlowState};
use sim::*;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant as WallClock};

/// B listens here (real flow 0: A connects).
const PORT_B: u16 = 888;
/// A listens here (real flow 1: B connects).
const PORT_A: u16 = 999;
/// Seeds run by the test (`RX_FUZZ_SEEDS=N` runs more: a soak; `RX_FUZZ_FIRST=K` starts at K).
const SEEDS: u64 = 128;
/// Messages per direction of each real flow.
const MSGS: u64 = 32;
/// Messages of one direction that may be undelivered at once.
const AHEAD: u64 = 6;
/// Virtual time between bursts of hostile frames.
const TICK: Duration = Duration::from_micros(20);
/// Bytes in front of the UDP payload: Ethernet and IPv4 headers, UDP header.
const UDP_PAYLOAD_AT: usize = 14 + 20 + 8;

/// Transport seeds whose first ISN lies just below 2³² (found by a search over the endpoint's
/// ISN generator): A's first connect (real flow 0) and B's (real flow 1; a server's ISN is a
/// SYN cookie), so each direction's sequence numbers wrap within the first hundred packets on
/// one of the two flows. The test checks that they still do.
const WRAP_SEEDS: [[u64; 2]; 2] = [[101_466_007, 201_608_335], [227_241_051, 280_108_194]];

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn mac(&mut self) -> EthernetAddress {
        let r = self.next().to_le_bytes();
        EthernetAddress([r[0] & 0xfe | 0x02, r[1], r[2], r[3], r[4], r[5]])
    }
}

/// A real flow: its handle at A and at B.
#[derive(Debug, Clone, Copy)]
struct Real {
    ends: [FlowId; 2],
}

/// A Machnet frame's headers and payload.
struct Made {
    repr: FrameRepr,
    payload: Vec<u8>,
}

impl Made {
    fn bytes(&self) -> Vec<u8> {
        let mut buf = vec![0; FRAME_HEADER_LEN + self.payload.len()];
        let n = self.repr.emit_with_payload(&mut buf, &self.payload, ChecksumCaps::software()).expect("emit");
        buf.truncate(n);
        buf
    }
}

/// A valid Ethernet/IPv4/UDP frame with `repr`'s addresses around `udp_payload`.
fn udp_frame(repr: &FrameRepr, udp_payload: &[u8]) -> Vec<u8> {
    let caps = ChecksumCaps::software();
    let mut buf = vec![0; UDP_PAYLOAD_AT + udp_payload.len()];
    EthernetRepr { src_addr: repr.src_mac, dst_addr: repr.dst_mac, ethertype: EtherType::Ipv4 }.emit(&mut buf).unwrap();
    Ipv4Repr {
        src_addr: repr.src_ip,
        dst_addr: repr.dst_ip,
        protocol: IpProtocol::Udp,
        payload_len: 8 + udp_payload.len(),
        ttl: 64,
    }
    .emit(&mut buf[14..], caps)
    .unwrap();
    buf[UDP_PAYLOAD_AT..].copy_from_slice(udp_payload);
    UdpRepr { src_port: repr.src_port, dst_port: repr.dst_port }
        .emit(&mut buf[34..], repr.src_ip, repr.dst_ip, udp_payload.len(), caps)
        .unwrap();
    buf
}

/// Frames generated, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    garbage: u64,
    random: u64,
    truncated: u64,
    edges: u64,
    spoofed: u64,
    floods: u64,
    /// Left out: indistinguishable from the peer's own (see the module docs).
    peers_own: u64,
    /// Classified as Machnet frames and handed to an endpoint.
    reached: u64,
}

/// The generator of hostile frames.
struct Gen {
    rng: Rng,
    window: u32,
    mss: usize,
    tally: Tally,
}

const KNOWN_TYPES: [PacketType; 5] =
    [PacketType::Data, PacketType::Syn, PacketType::Ack, PacketType::SynAck, PacketType::Rst];

impl Gen {
    /// A sequence number with a bias towards the boundaries of the space.
    fn num(&mut self) -> u32 {
        if self.rng.chance(30) {
            self.rng.pick(&[0, 1, 2, 0x7fff_ffff, 0x8000_0000, 0x8000_0001, u32::MAX - 1, u32::MAX])
        } else {
            self.rng.next() as u32
        }
    }

    fn sack(&mut self) -> SackBitmap {
        let r = &mut self.rng;
        match r.below(5) {
            0 => SackBitmap::new(),
            1 => SackBitmap([u64::MAX; 4]),
            2 => SackBitmap([r.next(), r.next(), r.next(), r.next()]),
            3 => {
                let mut b = SackBitmap::new();
                b.set(r.below(256) as usize);
                b
            }
            _ => {
                let mut b = SackBitmap::new();
                b.0[r.below(4) as usize] = r.next();
                b
            }
        }
    }

    fn timestamp(&mut self, now: u64) -> u64 {
        let r = &mut self.rng;
        match r.below(8) {
            0 => 0,
            1 => 1,
            2 => now,
            3 => now.saturating_sub(r.below(2_000_000)),
            4 => now + r.below(10_000_000_000),
            5 => u64::MAX,
            6 => now.saturating_sub(1),
            _ => r.next(),
        }
    }

    fn payload_len(&mut self) -> usize {
        let mss = self.mss;
        match self.rng.below(7) {
            0 => 0,
            1 => 1,
            2 => mss,
            3 => mss + 1,
            4 => self.rng.below(1600) as usize,
            _ => 1 + self.rng.below(64) as usize,
        }
    }

    fn flags(&mut self) -> MsgFlags {
        let sane = [
            MsgFlags::FIRST | MsgFlags::LAST,
            MsgFlags::FIRST | MsgFlags::MORE,
            MsgFlags::MORE,
            MsgFlags::LAST,
            MsgFlags::empty(),
        ];
        if self.rng.chance(50) {
            self.rng.pick(&sane)
        } else {
            MsgFlags::from_bits_retain(self.rng.next() as u8)
        }
    }

    fn random_hdr(&mut self, now: u64) -> MachnetRepr {
        let packet_type =
            if self.rng.chance(60) { self.rng.pick(&KNOWN_TYPES) } else { PacketType::from(self.rng.next() as u8) };
        let sack = self.sack();
        let sack_count = if self.rng.chance(50) { sack.count() as u16 } else { self.rng.next() as u16 };
        MachnetRepr {
            packet_type,
            msg_flags: MsgFlags::from_bits_retain(self.rng.next() as u8),
            seqno: self.num(),
            ackno: self.num(),
            sack,
            sack_count,
            timestamp: self.timestamp(now),
        }
    }

    /// Addresses of a frame to `to`: random, nearly a real flow's, or exactly one's.
    fn addresses(&mut self, sim: &Sim, to: usize, reals: &[Real]) -> FrameRepr {
        let local = sim.sides[to].ep.local();
        let peer = sim.sides[1 - to].ep.local();
        let listen = if to == B { PORT_B } else { PORT_A };
        let r = &mut self.rng;
        let real = sim.sides[to].ep.flow_info(reals[r.below(reals.len() as u64) as usize].ends[to]);
        let mut repr = FrameRepr {
            src_mac: if r.chance(50) { peer.mac } else { r.mac() },
            dst_mac: r.pick(&[local.mac, local.mac, EthernetAddress::BROADCAST, EthernetAddress::ZERO]),
            src_ip: match r.below(10) {
                0..=2 => peer.ip,
                3 => local.ip,
                4 => Ipv4Addr::UNSPECIFIED,
                5 => Ipv4Addr::BROADCAST,
                6 => Ipv4Addr::from(r.next() as u32),
                _ => Ipv4Addr::new(198, 19, r.next() as u8, r.next() as u8),
            },
            dst_ip: if r.chance(90) { local.ip } else { Ipv4Addr::from(r.next() as u32) },
            src_port: match r.below(6) {
                0 => 0,
                1 => u16::MAX,
                2 => 1024 + r.below(64) as u16,
                3 => {
                    if to == B {
                        PORT_A
                    } else {
                        PORT_B
                    }
                }
                _ => r.next() as u16,
            },
            dst_port: match r.below(5) {
                0 | 1 => listen,
                2 => 0,
                _ => r.next() as u16,
            },
            hdr: MachnetRepr::control(PacketType::Ack, 0, 0),
        };
        if let Some(info) = real.filter(|_| r.chance(35)) {
            // A real flow's tuple, exactly or with one field off by one.
            repr.src_ip = info.tuple.remote_ip;
            repr.src_port = info.tuple.remote_port;
            repr.dst_port = info.tuple.local_port;
            let off = |x: u16, r: &mut Rng| if r.chance(50) { x.wrapping_add(1) } else { x.wrapping_sub(1) };
            match r.below(4) {
                0 => repr.src_port = off(repr.src_port, r),
                1 => repr.dst_port = off(repr.dst_port, r),
                2 => repr.src_ip = Ipv4Addr::from(u32::from(repr.src_ip) ^ 1),
                _ => {}
            }
        }
        repr
    }

    /// A valid frame with random addresses and random Machnet fields.
    fn random_frame(&mut self, sim: &Sim, to: usize, reals: &[Real]) -> Made {
        let mut repr = self.addresses(sim, to, reals);
        repr.hdr = self.random_hdr(sim.now.as_nanos());
        let n = self.payload_len();
        Made { repr, payload: self.rng.bytes(n) }
    }

    /// Random bytes, alone or behind valid lower headers.
    fn garbage(&mut self, sim: &Sim, to: usize, reals: &[Real]) -> Vec<u8> {
        match self.rng.below(4) {
            0 => {
                let n = if self.rng.chance(80) { self.rng.below(200) } else { self.rng.below(1600) };
                self.rng.bytes(n as usize)
            }
            1 => {
                let n = 14 + self.rng.below(200) as usize;
                let mut b = self.rng.bytes(n);
                let et: u16 = self.rng.pick(&[0x0800, 0x0806, 0x86dd, 0x8100]);
                b[12..14].copy_from_slice(&et.to_be_bytes());
                b
            }
            _ => {
                let repr = self.addresses(sim, to, reals);
                let n = self.rng.below(140) as usize;
                let mut p = self.rng.bytes(n);
                if p.len() >= 2 && self.rng.chance(70) {
                    p[..2].copy_from_slice(&0x4E53u16.to_be_bytes());
                }
                udp_frame(&repr, &p)
            }
        }
    }

    /// A frame on real flow `real`'s tuple at `to`, its numbers around the flow's edges.
    fn edge(&mut self, sim: &Sim, to: usize, real: Real) -> Made {
        let info = sim.sides[to].ep.flow_info(real.ends[to]).expect("real flow");
        let peer = sim.sides[1 - to].ep.flow_info(real.ends[1 - to]).expect("real flow");
        let (una, nxt, rcv, w) = (info.snd_una, info.snd_nxt, info.rcv_nxt, self.window);
        let now = sim.now.as_nanos();
        let half = 0x8000_0000u32;
        let r = &mut self.rng;
        // Random values drawn up front (the picks below borrow the generator).
        let (x, y) = (r.next() as u32, r.next() as u32);
        let (back, far) = (r.below(256) as u32, r.below(u64::from(half - w)) as u32);
        let mut hdr = MachnetRepr::control(PacketType::Ack, peer.snd_nxt, una);
        let mut payload = Vec::new();
        match r.below(12) {
            0..=3 => {
                hdr.ackno = r.pick(&[
                    una.wrapping_sub(1),
                    una,
                    nxt,
                    nxt.wrapping_add(1),
                    nxt.wrapping_add(2),
                    nxt.wrapping_sub(1),
                    una.wrapping_sub(w),
                    una.wrapping_sub(w + 1),
                    nxt.wrapping_add(w),
                    una.wrapping_add(half),
                    una.wrapping_add(half - 1),
                    nxt.wrapping_add(half),
                    0,
                    u32::MAX,
                    x,
                ]);
                hdr.seqno = r.pick(&[peer.snd_nxt, peer.snd_nxt.wrapping_add(1), peer.snd_una, rcv, y]);
                let out = info.in_flight as usize;
                hdr.sack = match r.below(7) {
                    0 => SackBitmap::new(),
                    1 => SackBitmap([u64::MAX; 4]),
                    2 => {
                        // Bit 0: the packet at ackno itself, which the ackno says is missing.
                        let mut b = SackBitmap::new();
                        b.set(0);
                        b
                    }
                    3 => {
                        // Just past what was sent.
                        let mut b = SackBitmap::new();
                        b.set(out.min(255));
                        b
                    }
                    4 => {
                        let mut b = SackBitmap::new();
                        for d in 0..out.min(256) {
                            b.set(d);
                        }
                        b
                    }
                    _ => SackBitmap([r.next(), r.next(), r.next(), r.next()]),
                };
                let c = hdr.sack.count() as u16;
                hdr.sack_count = r.pick(&[c, 0, u16::MAX, c.wrapping_add(1), y as u16]);
            }
            4..=6 => {
                hdr.packet_type = PacketType::Data;
                hdr.seqno = r.pick(&[
                    rcv.wrapping_sub(1),
                    rcv.wrapping_sub(1 + back),
                    rcv.wrapping_sub(256),
                    rcv.wrapping_sub(257),
                    rcv.wrapping_add(w),
                    rcv.wrapping_add(w + 1),
                    rcv.wrapping_add(w + far),
                    rcv.wrapping_add(half),
                    rcv.wrapping_add(half + 1),
                    rcv.wrapping_sub(half - 1),
                    // In the window: only with an empty or oversized payload (`peers_own`).
                    rcv,
                    rcv.wrapping_add(w - 1),
                ]);
                hdr.ackno = r.pick(&[MachnetRepr::DATA_ACKNO, una, nxt, x]);
            }
            7 | 8 => {
                hdr.packet_type = PacketType::Rst;
                hdr.seqno = r.pick(&[
                    rcv.wrapping_sub(1),
                    rcv.wrapping_sub(w),
                    rcv.wrapping_add(w),
                    rcv.wrapping_add(w + 1),
                    rcv.wrapping_add(half),
                    0,
                ]);
                hdr.ackno = r.pick(&[0, una, una.wrapping_sub(1), nxt.wrapping_add(1), nxt, rcv, y]);
            }
            9 => {
                hdr.packet_type = PacketType::Syn;
                hdr.seqno = r.pick(&[rcv.wrapping_sub(1), peer.snd_una, x]);
                hdr.ackno = r.pick(&[0, una, y]);
            }
            10 => {
                hdr.packet_type = PacketType::SynAck;
                hdr.seqno = r.pick(&[rcv.wrapping_sub(1), peer.snd_una, x]);
                hdr.ackno = r.pick(&[nxt, una, una.wrapping_add(1), y]);
            }
            _ => {
                hdr.packet_type = PacketType::from(r.pick(&[0x04, 0x7f, 0x81, 0xff, x as u8]));
                hdr.seqno = x;
                hdr.ackno = y;
            }
        }
        if hdr.packet_type == PacketType::Data {
            hdr.msg_flags = self.flags();
            let n = self.payload_len();
            payload = self.rng.bytes(n);
        } else if self.rng.chance(10) {
            // A payload where none belongs.
            let n = self.payload_len();
            payload = self.rng.bytes(n);
        }
        hdr.timestamp = self.timestamp(now);
        let local = sim.sides[to].ep.local();
        let repr = FrameRepr {
            src_mac: sim.sides[1 - to].ep.local().mac,
            dst_mac: local.mac,
            src_ip: info.tuple.remote_ip,
            dst_ip: local.ip,
            src_port: info.tuple.remote_port,
            dst_port: info.tuple.local_port,
            hdr,
        };
        Made { repr, payload }
    }

    /// A SYN from a forged source to `to`'s listener, and what would complete the handshake
    /// without the SYN-ACK.
    fn spoofed_handshake(&mut self, sim: &Sim, to: usize) -> Vec<Made> {
        let local = sim.sides[to].ep.local();
        let r = &mut self.rng;
        let isn = if r.chance(20) { u32::MAX - r.below(4) as u32 } else { r.next() as u32 };
        let ts = if r.chance(20) { 0 } else { sim.now.as_nanos() };
        let repr = FrameRepr {
            src_mac: r.mac(),
            dst_mac: local.mac,
            src_ip: Ipv4Addr::new(198, 19, r.next() as u8, r.next() as u8),
            dst_ip: local.ip,
            src_port: 1024 + r.below(60_000) as u16,
            dst_port: if to == B { PORT_B } else { PORT_A },
            hdr: MachnetRepr { timestamp: ts, ..MachnetRepr::control(PacketType::Syn, isn, 0) },
        };
        let mut out = vec![Made { repr, payload: Vec::new() }];
        let next = isn.wrapping_add(1);
        let data = |seqno: u32, flags: MsgFlags| MachnetRepr::data(seqno, flags, ts.max(1));
        let follow: Vec<(MachnetRepr, usize)> = match r.below(6) {
            0 | 1 => vec![(data(next, MsgFlags::FIRST | MsgFlags::LAST), 1 + r.below(100) as usize)],
            2 => vec![
                (data(next, MsgFlags::FIRST | MsgFlags::MORE), self.mss),
                (data(next.wrapping_add(1), MsgFlags::LAST), 10),
            ],
            3 => (0..4)
                .map(|_| {
                    let g = r.next() as u32;
                    let guess = r.pick(&[1, 0, u32::MAX, g]);
                    (MachnetRepr::control(PacketType::Ack, next, guess), 0)
                })
                .collect(),
            4 => vec![(MachnetRepr::control(PacketType::Rst, next, 0), 0)],
            _ => vec![(MachnetRepr::control(PacketType::Syn, r.next() as u32, 0), 0)],
        };
        for (hdr, n) in follow {
            let payload = self.rng.bytes(n);
            out.push(Made { repr: FrameRepr { hdr, ..repr }, payload });
        }
        out
    }

    /// A SYN flood to `to`'s listener: from many forged sources, or from one.
    fn flood(&mut self, sim: &Sim, to: usize) -> Vec<Made> {
        let local = sim.sides[to].ep.local();
        let r = &mut self.rng;
        let one = r.chance(50).then(|| Ipv4Addr::new(198, 19, r.next() as u8, r.next() as u8));
        (0..40)
            .map(|_| {
                let src_ip = one.unwrap_or_else(|| Ipv4Addr::new(198, 19, r.next() as u8, r.next() as u8));
                let hdr = MachnetRepr {
                    timestamp: r.next() >> 1,
                    ..MachnetRepr::control(PacketType::Syn, r.next() as u32, 0)
                };
                let repr = FrameRepr {
                    src_mac: r.mac(),
                    dst_mac: local.mac,
                    src_ip,
                    dst_ip: local.ip,
                    src_port: 1024 + r.below(60_000) as u16,
                    dst_port: if to == B { PORT_B } else { PORT_A },
                    hdr,
                };
                Made { repr, payload: Vec::new() }
            })
            .collect()
    }

    /// `m` cut short: at one random length of each kind, or (`all`) at every length.
    fn truncations(&mut self, m: &Made, all: bool) -> Vec<Vec<u8>> {
        let full = m.bytes();
        let machnet = &full[UDP_PAYLOAD_AT..];
        let mut out = Vec::new();
        if all {
            for n in 0..full.len() {
                out.push(full[..n].to_vec());
            }
            for n in 0..machnet.len() {
                out.push(udp_frame(&m.repr, &machnet[..n]));
            }
        } else {
            let n = self.rng.below(full.len() as u64) as usize;
            out.push(full[..n].to_vec());
            let n = self.rng.below(machnet.len() as u64) as usize;
            out.push(udp_frame(&m.repr, &machnet[..n]));
        }
        out
    }

    /// One burst of hostile frames for `to`.
    fn burst(&mut self, sim: &Sim, to: usize, reals: &[Real]) -> Vec<Vec<u8>> {
        let real = reals[self.rng.below(reals.len() as u64) as usize];
        match self.rng.below(40) {
            0 => {
                self.tally.floods += 1;
                self.flood(sim, to).iter().map(Made::bytes).collect()
            }
            1..=3 => {
                self.tally.garbage += 1;
                vec![self.garbage(sim, to, reals)]
            }
            4..=15 => {
                self.tally.random += 1;
                vec![self.random_frame(sim, to, reals).bytes()]
            }
            16 | 17 => {
                let m = if self.rng.chance(50) { self.random_frame(sim, to, reals) } else { self.edge(sim, to, real) };
                let t = self.truncations(&m, false);
                self.tally.truncated += t.len() as u64;
                t
            }
            18..=21 => {
                self.tally.spoofed += 1;
                self.spoofed_handshake(sim, to).iter().map(Made::bytes).collect()
            }
            _ => {
                self.tally.edges += 1;
                vec![self.edge(sim, to, real).bytes()]
            }
        }
    }
}

/// True if `frame`, arriving at `to`, carries a real flow's tuple and numbers its peer could
/// have sent itself (see the module docs): those are not generated.
fn peers_own(sim: &Sim, to: usize, reals: &[Real], frame: &[u8]) -> bool {
    let Ok(Frame::Machnet(m)) = classify(frame, ChecksumCaps::software()) else { return false };
    let ep = &sim.sides[to].ep;
    if m.dst_ip != ep.local().ip {
        return false;
    }
    let w = ep.config().window as u32;
    for real in reals {
        let info = ep.flow_info(real.ends[to]).expect("real flow");
        let t = info.tuple;
        if (t.remote_ip, t.remote_port, t.local_port) != (m.src_ip, m.src_port, m.dst_port) {
            continue;
        }
        if info.state != FlowState::Established {
            return true;
        }
        let peer = sim.sides[1 - to].ep.flow_info(real.ends[1 - to]).expect("real flow");
        let (h, una, nxt) = (m.hdr, info.snd_una, info.snd_nxt);
        let in_window = |s: u32| seq::in_range(s, info.rcv_nxt, info.rcv_nxt.wrapping_add(w));
        let acks_in_flight = |a: u32| seq::gt(a, una) && seq::le(a, nxt);
        return match h.packet_type {
            PacketType::Data if !(1..=ep.config().mss).contains(&m.payload.len()) => false,
            PacketType::Data if in_window(h.seqno) => true,
            // A flow that carries ACKs in DATA reads the ACK of a retransmission too (a
            // sequence number up to a window below `rcv_nxt`): as for a pure ACK.
            PacketType::Data => {
                info.acks_in_data
                    && seq::in_range(h.seqno, info.rcv_nxt.wrapping_sub(w), info.rcv_nxt)
                    && acks_in_flight(h.ackno)
                    && seq::gt(h.ackno, peer.rcv_nxt)
            }
            PacketType::Rst => in_window(h.seqno) || (h.seqno == 0 && acks_in_flight(h.ackno)),
            PacketType::Ack => acks_in_flight(h.ackno) && seq::gt(h.ackno, peer.rcv_nxt),
            _ => false,
        };
    }
    false
}

/// Listens on A:`port`, connects from B, runs until both ends are established.
fn connect_from_b(sim: &mut Sim, port: u16) -> (FlowId, FlowId) {
    sim.sides[A].ep.listen(OWNER, port).expect("listen");
    let now = sim.now;
    let b = &mut sim.sides[B];
    let fb = b.ep.connect(now, &mut b.env, OWNER, IP_A, MAC_A, port, 7).expect("connect");
    b.env.flush_tx();
    let up = |s: &Sim, side: usize| s.sides[side].ep.flows().filter(|f| f.state == FlowState::Established).count() == 2;
    assert!(sim.run_until(Duration::from_secs(5), |s| up(s, A) && up(s, B)), "B's connect did not complete");
    let fa = sim.sides[A].ep.flows().find(|f| f.tuple.local_port == port).expect("accepted").id;
    sim.sides[A].env.events.clear();
    sim.sides[B].env.events.clear();
    (fb, fa)
}

/// A message size: tiny, around the MSS, a few packets, or many.
fn size(r: &mut Rng) -> usize {
    match r.below(20) {
        0..=6 => 1 + r.below(100) as usize,
        7..=9 => r.pick(&[SEG_SIZE - 1, SEG_SIZE, SEG_SIZE + 1, 2 * SEG_SIZE, 2 * SEG_SIZE + 1]),
        10..=17 => 100 + r.below(20_000) as usize,
        _ => 20_000 + r.below(50_000) as usize,
    }
}

/// One direction of a real flow: from `side` on `flow`, to `peer`.
struct Stream {
    side: usize,
    flow: FlowId,
    peer: FlowId,
    id: u64,
    sent: u64,
}

/// An endpoint counter, by name.
type Counter = (&'static str, fn(&EndpointStats) -> u64);

/// Counters of one run, summed over the seeds.
#[derive(Default)]
struct Totals {
    tally: Tally,
    stats: Vec<EndpointStats>,
    virtual_time: Duration,
}

fn add(t: &mut Tally, o: &Tally) {
    t.garbage += o.garbage;
    t.random += o.random;
    t.truncated += o.truncated;
    t.edges += o.edges;
    t.spoofed += o.spoofed;
    t.floods += o.floods;
    t.peers_own += o.peers_own;
    t.reached += o.reached;
}

/// Injects `frames` at `to`, leaving out what is the peer's own.
fn inject_all(sim: &mut Sim, gen: &mut Gen, seed: u64, to: usize, reals: &[Real], frames: Vec<Vec<u8>>) {
    for f in frames {
        if peers_own(sim, to, reals, &f) {
            gen.tally.peers_own += 1;
            continue;
        }
        if sim.inject_bytes(to, &f) {
            gen.tally.reached += 1;
            if let Some((_, e)) = sim.sides.iter().flat_map(|s| s.env.events.iter()).next() {
                let Ok(Frame::Machnet(m)) = classify(&f, ChecksumCaps::software()) else { unreachable!() };
                panic!(
                    "seed {seed}: {e:?} after a hostile frame to side {to}: {}:{} -> {}:{} {:?}, {} bytes of payload",
                    m.src_ip,
                    m.src_port,
                    m.dst_ip,
                    m.dst_port,
                    m.hdr,
                    m.payload.len()
                );
            }
        }
    }
}

/// Fails if anything happened to a flow (see the module docs: nothing may, once they are up).
#[track_caller]
fn assert_no_events(sim: &Sim, seed: u64) {
    for (i, s) in sim.sides.iter().enumerate() {
        assert!(s.env.events.is_empty(), "seed {seed}: side {i} saw events at {:?}: {:?}", sim.now, s.env.events);
    }
}

fn run_seed(seed: u64, totals: &mut Totals) {
    // Seeds vary the congestion control (Swift; a fixed window as the original's), how fast
    // the applications read (at once; one message every 20 us into a ring of four) and the
    // receive pool (ample; a few large messages' worth, so packets are dropped and reneged).
    let cc = if seed % 2 == 0 { CcConfig::default() } else { CcConfig::Fixed { window: 32 } };
    let transport = Config { cc, ..Config::default().with_max_flows(64) };
    let mut cfg = SimConfig::link(transport).faults(0.02, 0.05, 0.01, 0.005, Duration::from_micros(2));
    cfg.ab.seed = 1000 + seed;
    cfg.ba.seed = 2000 + seed;
    cfg.segs = 8192;
    cfg.rx_segs = if seed % 5 == 4 { 160 } else { 4096 };
    if seed % 3 == 2 {
        cfg.inbox = 4;
    }
    cfg.seeds = WRAP_SEEDS.get(seed as usize).copied().unwrap_or([3 + 2 * seed, 4 + 2 * seed]);
    let mut sim = Sim::new(cfg);
    let (a0, b0) = sim.connect(PORT_B);
    let (b1, a1) = connect_from_b(&mut sim, PORT_A);
    let reals = [Real { ends: [a0, b0] }, Real { ends: [a1, b1] }];
    let info = |sim: &Sim, side: usize, f: FlowId| sim.sides[side].ep.flow_info(f).expect("real flow");
    let wraps = (seed as usize) < WRAP_SEEDS.len();
    if wraps {
        for (side, f) in [(A, a0), (B, b1)] {
            let una = info(&sim, side, f).snd_una;
            assert!(una > u32::MAX - 128, "seed {seed}: ISN {una:#x} is not near 2^32: the ISN generator changed");
        }
    }
    for s in &mut sim.sides {
        s.allow_strangers = true;
        if seed % 3 == 2 {
            s.read_every = Some(Duration::from_micros(20));
        }
    }
    let mut gen = Gen {
        rng: Rng(0xf00d ^ seed.wrapping_mul(0x1234_5678_9abc)),
        window: transport.window as u32,
        mss: transport.mss,
        tally: Tally::default(),
    };
    let mut sizes = Rng(seed);
    let mut streams: Vec<Stream> = reals
        .iter()
        .enumerate()
        .flat_map(|(k, r)| {
            [A, B].map(|side| Stream {
                side,
                flow: r.ends[side],
                peer: r.ends[1 - side],
                id: 16 * seed + 2 * k as u64 + side as u64,
                sent: 0,
            })
        })
        .collect();
    let t0 = sim.now;
    // The transfer, with hostile frames all along; then a little more on the idle flows, with
    // a sweep of every truncation of one frame per side.
    let mut idle_until = None;
    loop {
        for s in &mut streams {
            while s.sent < MSGS && s.sent - sim.delivered(1 - s.side, s.peer) < AHEAD {
                let len = size(&mut sizes);
                sim.send(s.side, s.flow, s.peer, s.id, s.sent, len).expect("send on a real flow");
                s.sent += 1;
            }
        }
        for _ in 0..gen.rng.below(6) {
            let to = gen.rng.below(2) as usize;
            let frames = gen.burst(&sim, to, &reals);
            inject_all(&mut sim, &mut gen, seed, to, &reals, frames);
        }
        sim.run_for(TICK);
        assert_no_events(&sim, seed);
        let done = streams.iter().all(|s| s.sent == MSGS && sim.delivered(1 - s.side, s.peer) == MSGS);
        match idle_until {
            None if done => idle_until = Some(sim.now + Duration::from_millis(5)),
            Some(t) if sim.now >= t => break,
            _ => {}
        }
        assert!(
            sim.now - t0 < Duration::from_secs(10),
            "seed {seed}: transfer stalled: {:?}",
            streams.iter().map(|s| (s.sent, sim.delivered(1 - s.side, s.peer))).collect::<Vec<_>>()
        );
    }
    for to in [A, B] {
        let m = if gen.rng.chance(50) {
            let real = reals[gen.rng.below(2) as usize];
            gen.edge(&sim, to, real)
        } else {
            let mut m = gen.random_frame(&sim, to, &reals);
            m.payload.truncate(40);
            m
        };
        let frames = gen.truncations(&m, true);
        gen.tally.truncated += frames.len() as u64;
        inject_all(&mut sim, &mut gen, seed, to, &reals, frames);
    }
    // Quiet: every handshake timeout passes.
    sim.run_for(Duration::from_secs(30));
    for (i, s) in sim.sides.iter().enumerate() {
        assert!(s.env.events.is_empty(), "seed {seed}: side {i} saw events {:?}", s.env.events);
        assert_eq!(s.strangers, 0, "seed {seed}: side {i}: a forged flow delivered messages");
        let flows: Vec<FlowInfo> = s.ep.flows().collect();
        assert_eq!(flows.len(), 2, "seed {seed}: side {i} holds flows besides the real ones: {flows:#?}");
        for f in &flows {
            assert!(reals.iter().any(|r| r.ends[i] == f.id), "seed {seed}: side {i}: a forged flow {f:?}");
            assert_eq!(f.state, FlowState::Established, "seed {seed}: side {i}");
            assert_eq!((f.in_flight, f.queued), (0, 0), "seed {seed}: side {i}: {f:?}");
        }
        assert_eq!(s.ep.half_open_count(), 0, "seed {seed}: side {i}");
        assert_eq!(s.ep.half_open_sources().count(), 0, "seed {seed}: side {i}");
        assert!(s.env.timers.iter().all(Option::is_none), "seed {seed}: side {i}: timers left {:?}", s.env.timers);
        assert_eq!(
            (s.env.segs.tx_in_use, s.env.segs.rx_in_use),
            (0, 0),
            "seed {seed}: side {i} holds segments: {:?}",
            s.ep.stats()
        );
        assert_eq!(s.ep.stats().flows_failed, 0, "seed {seed}: side {i}");
    }
    if wraps {
        for (side, f) in [(A, a0), (B, b1)] {
            let una = info(&sim, side, f).snd_una;
            assert!(una < 1 << 20, "seed {seed}: side {side}'s sequence numbers did not wrap: {una:#x}");
        }
    }
    // The real flows still carry messages.
    for s in &streams {
        sim.send(s.side, s.flow, s.peer, s.id, MSGS, 5000).expect("send after the storm");
    }
    assert!(
        sim.run_until(Duration::from_secs(1), |sim| streams
            .iter()
            .all(|s| sim.delivered(1 - s.side, s.peer) == MSGS + 1)),
        "seed {seed}: the real flows no longer deliver"
    );
    add(&mut totals.tally, &gen.tally);
    totals.virtual_time += sim.now - t0;
    for s in &sim.sides {
        totals.stats.push(*s.ep.stats());
    }
}

/// The frame fuzzer over [`SEEDS`] seeds (see the module docs).
#[test]
fn hostile_frames_leave_real_flows_intact_and_nothing_behind() {
    let start = WallClock::now();
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse().ok());
    let seeds = env("RX_FUZZ_SEEDS").unwrap_or(SEEDS);
    // RX_FUZZ_FIRST=N starts at seed N (to replay one a soak reported).
    let first: u64 = env("RX_FUZZ_FIRST").unwrap_or(0);
    let mut totals = Totals::default();
    for seed in first..first + seeds {
        run_seed(seed, &mut totals);
    }
    let sum = |f: fn(&EndpointStats) -> u64| totals.stats.iter().map(f).sum::<u64>();
    let t = totals.tally;
    eprintln!(
        "{seeds} seeds in {:?} ({:?} virtual): {t:?}; unknown type {}, bad ack {}, RST ignored {}, out of window {}, \
         duplicate {}, bad length {}, unexpected {}, challenged {}, no flow {}, not for us {}, SYN evicted {}, \
         source limited {}, accept timeouts {}, unproven data {}, no buffer {}, reneged {}, \
         blocked {}",
        start.elapsed(),
        totals.virtual_time,
        sum(|s| s.rx_unknown_type),
        sum(|s| s.rx_bad_ack),
        sum(|s| s.rx_rst_ignored),
        sum(|s| s.rx_out_of_window),
        sum(|s| s.rx_duplicate),
        sum(|s| s.rx_bad_length),
        sum(|s| s.rx_unexpected),
        sum(|s| s.syn_challenged),
        sum(|s| s.rx_no_flow),
        sum(|s| s.rx_not_for_us),
        sum(|s| s.syn_evicted),
        sum(|s| s.syn_source_limited),
        sum(|s| s.accept_timeouts),
        sum(|s| s.rx_unproven_data),
        sum(|s| s.rx_no_buffer),
        sum(|s| s.rx_reneged),
        sum(|s| s.deliver_blocked),
    );
    // Every kind of frame reached the code it aims at.
    let covered: [Counter; 14] = [
        ("rx_unproven_data", |s| s.rx_unproven_data),
        ("syn_evicted", |s| s.syn_evicted),
        ("syn_source_limited", |s| s.syn_source_limited),
        ("rx_unknown_type", |s| s.rx_unknown_type),
        ("rx_bad_ack", |s| s.rx_bad_ack),
        ("rx_rst_ignored", |s| s.rx_rst_ignored),
        ("rx_out_of_window", |s| s.rx_out_of_window),
        ("rx_duplicate", |s| s.rx_duplicate),
        ("rx_bad_length", |s| s.rx_bad_length),
        ("rx_unexpected", |s| s.rx_unexpected),
        ("syn_challenged", |s| s.syn_challenged),
        ("rx_no_flow", |s| s.rx_no_flow),
        ("rx_not_for_us", |s| s.rx_not_for_us),
        ("accept_timeouts", |s| s.accept_timeouts),
    ];
    for (name, f) in covered {
        assert!(sum(f) > 0, "no hostile frame reached {name}");
    }
    assert!(t.reached > 10 * t.peers_own, "too many frames left out as the peer's own: {t:?}");
}
