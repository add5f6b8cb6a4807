//! The receive path of two endpoints, next to an established flow between them, on frames
//! decoded from the input: raw bytes (through the frame classifier), and structure-aware
//! frames whose sequence and acknowledgement numbers are taken relative to the real flow's
//! state (`snd_una`, `snd_nxt`, `rcv_nxt`, plus an offset) or raw, on the real flow's tuple, a
//! near miss, or to the listener from a forged source. Between frames the real flow carries
//! messages both ways over a link that loses what the input says.
//!
//! Frames the peer could have sent itself (DATA or an RST in the receive window, an RST with
//! seqno 0 acknowledging a packet in flight, an ACK of what the peer has not received: see
//! transport/tests/rx_fuzz.rs) are left out: no protocol without cryptography can tell them
//! from the peer's. A forged flow the input completes is allowed (the fuzzer learns the
//! deterministic ISNs; on a network they are random).
//!
//! Invariants: no panic; every segment is accounted for (double frees and foreign segments
//! assert); every message of the real flow arrives once, in order, intact; the real flow is
//! never reset, failed or closed; once the frames stop and the handshake timeouts pass, no
//! half-open flow is left, the real flow is idle and holds nothing, and after every flow is
//! aborted no segment is in use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machnet_net::time::Instant;
use machnet_net::wire::{
    classify, ChecksumCaps, EtherType, EthernetAddress, EthernetRepr, Frame, FrameRepr, IpProtocol, Ipv4Repr,
    MachnetFrame, MachnetRepr, MsgFlags, PacketType, SackBitmap, UdpRepr,
};
use machnet_transport::cc::CcConfig;
use machnet_transport::{
    seq, Config, Endpoint, Env, Event, FlowId, FlowState, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, Seg,
};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

const MSS: usize = 128;
const SEGS: usize = 2048;
const OWNER: Owner = 1;
const PORT: u16 = 888;
const MACS: [EthernetAddress; 2] = [EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])];
const IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)];

#[derive(Clone, Copy, PartialEq)]
enum State {
    Free,
    Tx,
    Rx,
}

/// One side's environment: a segment slab, the frames it sent, its timers and events, and
/// its application's ring and checker.
struct Side {
    data: Vec<[u8; MSS]>,
    len: Vec<usize>,
    flags: Vec<MsgFlags>,
    next: Vec<Seg>,
    state: Vec<State>,
    free: Vec<Seg>,
    out: VecDeque<(FrameRepr, Vec<u8>)>,
    timers: Vec<Option<(FlowId, Instant)>>,
    events: Vec<Event>,
    inbox: VecDeque<(FlowId, InMsg)>,
    /// Lengths of the messages the real flow must deliver here, in order.
    expect: VecDeque<usize>,
    received: u64,
}

impl Side {
    fn new(max_flows: usize) -> Self {
        Side {
            data: vec![[0; MSS]; SEGS],
            len: vec![0; SEGS],
            flags: vec![MsgFlags::empty(); SEGS],
            next: vec![Seg::MAX; SEGS],
            state: vec![State::Free; SEGS],
            free: (0..SEGS as Seg).rev().collect(),
            out: VecDeque::new(),
            timers: vec![None; max_flows],
            events: Vec::new(),
            inbox: VecDeque::new(),
            expect: VecDeque::new(),
            received: 0,
        }
    }
    fn take(&mut self, st: State) -> Option<Seg> {
        let s = self.free.pop()?;
        assert!(self.state[s as usize] == State::Free);
        self.state[s as usize] = st;
        self.next[s as usize] = Seg::MAX;
        Some(s)
    }
    fn put(&mut self, s: Seg, st: State) {
        assert!(self.state[s as usize] == st, "segment {s} freed in the wrong state");
        self.state[s as usize] = State::Free;
        self.free.push(s);
    }
    fn in_use(&self) -> usize {
        SEGS - self.free.len()
    }
}

impl Env for Side {
    fn alloc_rx(&mut self, _o: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg> {
        assert!(!payload.is_empty() && payload.len() <= MSS);
        if self.free.len() < 256 {
            return None;
        }
        let s = self.take(State::Rx)?;
        self.data[s as usize][..payload.len()].copy_from_slice(payload);
        self.len[s as usize] = payload.len();
        self.flags[s as usize] = flags;
        Some(s)
    }
    fn link_rx(&mut self, _o: Owner, prev: Seg, next: Seg) {
        assert!(self.state[prev as usize] == State::Rx && self.state[next as usize] == State::Rx);
        self.next[prev as usize] = next;
    }
    fn free_rx(&mut self, _o: Owner, seg: Seg) {
        self.put(seg, State::Rx);
    }
    fn free_rx_chain(&mut self, _o: Owner, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let n = self.next[s as usize];
            self.put(s, State::Rx);
            s = n;
        }
    }
    fn deliver(&mut self, _o: Owner, flow: FlowId, _t: &FlowTuple, msg: &InMsg) -> bool {
        if self.inbox.len() >= 8 {
            return false;
        }
        self.inbox.push_back((flow, *msg));
        true
    }
    fn tx_meta(&self, _o: Owner, seg: Seg) -> (usize, MsgFlags) {
        assert!(self.state[seg as usize] == State::Tx);
        (self.len[seg as usize], self.flags[seg as usize])
    }
    fn tx_next(&self, _o: Owner, seg: Seg) -> Option<Seg> {
        let n = self.next[seg as usize];
        (n != Seg::MAX).then_some(n)
    }
    fn tx_link(&mut self, _o: Owner, prev: Seg, next: Seg) {
        self.next[prev as usize] = next;
    }
    fn free_tx(&mut self, _o: Owner, seg: Seg) {
        self.put(seg, State::Tx);
    }
    fn transmit(&mut self, _o: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        let bytes = payload.map(|s| self.data[s as usize][..self.len[s as usize]].to_vec()).unwrap_or_default();
        if self.out.len() < 4096 {
            self.out.push_back((*frame, bytes));
        }
        true
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timers[flow.index() as usize] = at.map(|t| (flow, t));
    }
    fn event(&mut self, _o: Owner, e: Event) {
        self.events.push(e);
    }
}

fn pattern(dir: usize, k: u64, j: usize) -> u8 {
    ((dir as u64 * 77) ^ k.wrapping_mul(131) ^ (j as u64 * 7)) as u8
}

/// The input, read a byte at a time (zeros once it runs out).
struct Input<'a>(std::slice::Iter<'a, u8>);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

struct World {
    eps: [Endpoint; 2],
    sides: [Side; 2],
    now: Instant,
    /// The real flow at A (the client) and at B.
    real: [FlowId; 2],
    sent: [u64; 2],
}

impl World {
    /// Delivers every queued frame both ways (until quiet), fires due timers, lets the
    /// applications read.
    fn settle(&mut self) {
        for _ in 0..64 {
            let mut any = false;
            for from in 0..2 {
                while let Some((frame, payload)) = self.sides[from].out.pop_front() {
                    any = true;
                    if frame.dst_ip != IPS[1 - from] {
                        continue; // to a forged source: nobody there
                    }
                    let m = MachnetFrame {
                        src_mac: frame.src_mac,
                        dst_mac: frame.dst_mac,
                        src_ip: frame.src_ip,
                        dst_ip: frame.dst_ip,
                        src_port: frame.src_port,
                        dst_port: frame.dst_port,
                        hdr: frame.hdr,
                        payload: &payload,
                    };
                    let (ep, to) = (&mut self.eps[1 - from], &mut self.sides[1 - from]);
                    ep.handle(self.now, to, &m);
                    ep.flush(self.now, to);
                }
            }
            for i in 0..2 {
                any |= self.read(i);
            }
            if !any {
                break;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        for (ep, side) in self.eps.iter_mut().zip(self.sides.iter_mut()) {
            for t in 0..side.timers.len() {
                if let Some((flow, at)) = side.timers[t] {
                    if at <= self.now {
                        side.timers[t] = None;
                        ep.on_timer(self.now, side, flow);
                    }
                }
            }
            ep.flush(self.now, side);
        }
        self.settle();
    }

    /// Jumps to the next timer, if any within `limit`.
    fn next_timer(&mut self, limit: Instant) -> bool {
        let next = self.sides.iter().flat_map(|s| s.timers.iter().flatten().map(|(_, t)| *t)).min();
        match next {
            Some(t) if t <= limit => {
                let d = t.saturating_since(self.now);
                self.advance(d);
                true
            }
            _ => false,
        }
    }

    fn read(&mut self, i: usize) -> bool {
        let real = self.real[i];
        let (ep, side) = (&mut self.eps[i], &mut self.sides[i]);
        let mut any = false;
        while let Some((flow, msg)) = side.inbox.pop_front() {
            any = true;
            let mut bytes = Vec::new();
            let mut s = msg.head;
            for _ in 0..msg.count {
                bytes.extend_from_slice(&side.data[s as usize][..side.len[s as usize]]);
                s = side.next[s as usize];
            }
            assert_eq!(bytes.len(), msg.len as usize);
            if flow == real {
                let want = side.expect.pop_front().expect("more messages than were sent");
                assert_eq!(bytes.len(), want, "message length");
                let k = side.received;
                for (j, b) in bytes.iter().enumerate() {
                    assert_eq!(*b, pattern(1 - i, k, j), "message {k} byte {j}");
                }
                side.received += 1;
            }
            side.free_rx_chain(OWNER, msg.head, msg.count);
            ep.on_writable(OWNER);
        }
        ep.flush(self.now, side);
        any
    }

    fn send(&mut self, from: usize, len: usize) {
        let count = len.div_ceil(MSS);
        let k = self.sent[from];
        let (ep, side) = (&mut self.eps[from], &mut self.sides[from]);
        if side.free.len() < count + 512 {
            return;
        }
        let mut segs: Vec<Seg> = Vec::new();
        for i in 0..count {
            let s = side.take(State::Tx).unwrap();
            let n = (len - i * MSS).min(MSS);
            for j in 0..n {
                side.data[s as usize][j] = pattern(from, k, i * MSS + j);
            }
            side.len[s as usize] = n;
            side.flags[s as usize] = MsgFlags::for_fragment(i, count);
            if let Some(&p) = segs.last() {
                side.next[p as usize] = s;
            }
            segs.push(s);
        }
        let msg = OutMsg { head: segs[0], tail: *segs.last().unwrap(), count: count as u32, len: len as u32 };
        ep.send(side, self.real[from], &msg).expect("send on the real flow");
        ep.flush(self.now, side);
        self.sides[1 - from].expect.push_back(len);
        self.sent[from] += 1;
    }

    /// True if `m`, arriving at `to`, has the real flow's tuple and numbers its peer could
    /// send itself.
    fn peers_own(&self, to: usize, m: &MachnetFrame<'_>) -> bool {
        let ep = &self.eps[to];
        let info = ep.flow_info(self.real[to]).expect("the real flow");
        let t = info.tuple;
        if m.dst_ip != ep.local().ip || (t.remote_ip, t.remote_port, t.local_port) != (m.src_ip, m.src_port, m.dst_port)
        {
            return false;
        }
        if info.state != FlowState::Established {
            return true;
        }
        let peer = self.eps[1 - to].flow_info(self.real[1 - to]).expect("the real flow");
        let w = ep.config().window as u32;
        let (h, una, nxt) = (m.hdr, info.snd_una, info.snd_nxt);
        let in_window = |s: u32| seq::in_range(s, info.rcv_nxt, info.rcv_nxt.wrapping_add(w));
        let acks_in_flight = |a: u32| seq::gt(a, una) && seq::le(a, nxt);
        match h.packet_type {
            PacketType::Data if !(1..=MSS).contains(&m.payload.len()) => false,
            PacketType::Data if in_window(h.seqno) => true,
            // With ACKs in DATA, a retransmission's ACK (up to a window below) is read too.
            PacketType::Data => {
                info.acks_in_data
                    && seq::in_range(h.seqno, info.rcv_nxt.wrapping_sub(w), info.rcv_nxt)
                    && acks_in_flight(h.ackno)
                    && seq::gt(h.ackno, peer.rcv_nxt)
            }
            PacketType::Rst => in_window(h.seqno) || (h.seqno == 0 && acks_in_flight(h.ackno)),
            PacketType::Ack => acks_in_flight(h.ackno) && seq::gt(h.ackno, peer.rcv_nxt),
            _ => false,
        }
    }

    fn hostile(&mut self, to: usize, m: &MachnetFrame<'_>) {
        if self.peers_own(to, m) {
            return;
        }
        let (ep, side) = (&mut self.eps[to], &mut self.sides[to]);
        ep.handle(self.now, side, m);
        ep.flush(self.now, side);
    }

    /// A number relative to the real flow's state at `to` (`snd_una`, `snd_nxt` or `rcv_nxt`
    /// plus one of the offsets at the edges of the window and of the sequence space, or any
    /// 16-bit offset), or raw.
    fn number(&self, to: usize, input: &mut Input<'_>) -> u32 {
        let info = self.eps[to].flow_info(self.real[to]).expect("the real flow");
        let w = self.eps[to].config().window as u32;
        let sel = input.u8();
        let base = match sel & 3 {
            0 => info.snd_una,
            1 => info.snd_nxt,
            2 => info.rcv_nxt,
            _ => return input.u32(),
        };
        let edges = [0, 1, 2, w - 1, w, w + 1, 256, 257, 0x7fff_ffff, 0x8000_0000, 0x8000_0001];
        let i = usize::from(sel >> 3) % (edges.len() + 1);
        let off = match edges.get(i) {
            Some(&e) => e,
            None => i32::from(input.u16() as i16) as u32,
        };
        if sel & 4 != 0 {
            base.wrapping_sub(off)
        } else {
            base.wrapping_add(off)
        }
    }

    /// A structure-aware frame to `to`.
    fn structured(&mut self, to: usize, input: &mut Input<'_>) {
        let info = self.eps[to].flow_info(self.real[to]).expect("the real flow");
        let sel = input.u8();
        let (mut src_ip, mut src_port, mut dst_port) =
            (info.tuple.remote_ip, info.tuple.remote_port, info.tuple.local_port);
        match (sel >> 1) & 3 {
            0 | 1 => {}
            2 => match sel >> 3 & 3 {
                0 => src_port = src_port.wrapping_add(1),
                1 => dst_port = dst_port.wrapping_sub(1),
                2 => src_ip = Ipv4Addr::from(u32::from(src_ip) ^ 1),
                _ => src_ip = IPS[to],
            },
            _ => {
                src_ip = Ipv4Addr::new(198, 19, input.u8(), input.u8());
                src_port = input.u16();
                dst_port = if to == 1 { PORT } else { input.u16() };
            }
        }
        let known = [PacketType::Data, PacketType::Syn, PacketType::Ack, PacketType::SynAck, PacketType::Rst];
        let t = input.u8();
        let packet_type = match known.get(usize::from(t & 7)) {
            Some(&k) => k,
            None => PacketType::from(input.u8()),
        };
        let msg_flags = MsgFlags::from_bits_retain(input.u8());
        let seqno = self.number(to, input);
        let ackno = self.number(to, input);
        let mut sack = SackBitmap::new();
        match input.u8() & 3 {
            0 => {}
            1 => sack = SackBitmap([u64::MAX; 4]),
            2 => {
                let n = usize::from(input.u8());
                for d in 0..n {
                    sack.set(d);
                }
            }
            _ => sack.0[usize::from(input.u8() & 3)] = input.u64(),
        }
        let sack_count = input.u16();
        let now = self.now.as_nanos();
        let timestamp = match input.u8() & 3 {
            0 => 0,
            1 => now,
            2 => now.saturating_sub(u64::from(input.u16()) * 1000),
            _ => input.u64(),
        };
        let len = usize::from(input.u8());
        let payload = input.bytes(len);
        let m = MachnetFrame {
            src_mac: MACS[1 - to],
            dst_mac: MACS[to],
            src_ip,
            dst_ip: IPS[to],
            src_port,
            dst_port,
            hdr: MachnetRepr { packet_type, msg_flags, seqno, ackno, sack, sack_count, timestamp },
            payload: &payload,
        };
        self.hostile(to, &m);
    }

    /// Raw bytes through the classifier, or a valid Ethernet/IPv4/UDP datagram to `to` around
    /// them (with the Machnet magic in front, or not): every short or odd Machnet header.
    fn raw(&mut self, to: usize, input: &mut Input<'_>) {
        let sel = input.u8();
        let len = usize::from(input.u8());
        let mut bytes = input.bytes(len);
        if sel & 1 != 0 {
            if sel & 2 != 0 && bytes.len() >= 2 {
                bytes[..2].copy_from_slice(&0x4E53u16.to_be_bytes());
            }
            bytes = udp_frame(to, sel & 4 != 0, &bytes);
        }
        let Ok(Frame::Machnet(m)) = classify(&bytes, ChecksumCaps::software()) else { return };
        self.hostile(to, &m);
    }
}

/// A valid frame from the peer (on the real flow's ports, or the listener's) to `to` around
/// `udp_payload`.
fn udp_frame(to: usize, real_ports: bool, udp_payload: &[u8]) -> Vec<u8> {
    let caps = ChecksumCaps::software();
    let mut buf = vec![0; 42 + udp_payload.len()];
    EthernetRepr { src_addr: MACS[1 - to], dst_addr: MACS[to], ethertype: EtherType::Ipv4 }.emit(&mut buf).unwrap();
    let ip = Ipv4Repr {
        src_addr: IPS[1 - to],
        dst_addr: IPS[to],
        protocol: IpProtocol::Udp,
        payload_len: 8 + udp_payload.len(),
        ttl: 64,
    };
    ip.emit(&mut buf[14..], caps).unwrap();
    buf[42..].copy_from_slice(udp_payload);
    // The client's port is the lowest steering to its shard: 1024 without RSS.
    let (src_port, dst_port) = match (to, real_ports) {
        (1, true) => (1024, PORT),
        (0, true) => (PORT, 1024),
        _ => (4000, PORT),
    };
    UdpRepr { src_port, dst_port }.emit(&mut buf[34..], IPS[1 - to], IPS[to], udp_payload.len(), caps).unwrap();
    buf
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data.iter());
    let mode = input.u8();
    let cc = if mode & 1 != 0 { CcConfig::Fixed { window: 8 } } else { CcConfig::default() };
    let cfg = Config { mss: MSS, window: 64, max_message: 16 * MSS, cc, ..Config::default().with_max_flows(16) };
    let ep = |i: usize| {
        Endpoint::new(
            Config { seed: i as u64 + 1, ..cfg },
            LocalAddr { mac: MACS[i], ip: IPS[i] },
            LocalPorts::new(),
        )
        .unwrap()
    };
    let mut w = World {
        eps: [ep(0), ep(1)],
        sides: [Side::new(cfg.max_flows), Side::new(cfg.max_flows)],
        now: Instant::from_micros(1),
        real: [FlowId::from_parts(0, 0); 2],
        sent: [0; 2],
    };
    w.eps[1].listen(OWNER, PORT).unwrap();
    let now = w.now;
    let fa = w.eps[0].connect(now, &mut w.sides[0], OWNER, IPS[1], MACS[1], PORT, 1).unwrap();
    w.advance(Duration::from_micros(10));
    let fb = w.eps[1].flows().next().expect("accepted").id;
    assert_eq!(w.eps[0].flow_info(fa).unwrap().state, FlowState::Established);
    assert_eq!(w.eps[1].flow_info(fb).unwrap().state, FlowState::Established);
    // `udp_frame` aims at these ports (without RSS the lowest client port is taken).
    assert_eq!(w.eps[0].flow_info(fa).unwrap().tuple.local_port, 1024);
    w.real = [fa, fb];
    for s in &mut w.sides {
        s.events.clear();
    }
    let mut ops = 0;
    while input.0.len() > 0 && ops < 1000 {
        ops += 1;
        let op = input.u8();
        let to = usize::from(op >> 7);
        match op & 15 {
            0..=2 => w.raw(to, &mut input),
            3..=8 => w.structured(to, &mut input),
            9 | 10 => {
                let len = 1 + usize::from(input.u8()) * 8;
                w.send(to, len.min(16 * MSS));
            }
            11 => {
                // The link loses the oldest frame in flight.
                w.sides[to].out.pop_front();
            }
            12 => w.advance(Duration::from_micros(u64::from(input.u8()) * 20)),
            13 => w.advance(Duration::from_millis(u64::from(input.u8()))),
            _ => {}
        }
        w.settle();
    }
    // The frames stop: everything sent arrives, and every handshake timeout passes.
    let end = w.now + Duration::from_secs(60);
    while w.now < end && w.next_timer(end) {}
    w.advance(Duration::from_secs(1));
    for i in 0..2 {
        let side = &w.sides[i];
        for e in &side.events {
            match e {
                Event::PeerClosed { flow, .. } | Event::FlowFailed { flow, .. } | Event::Closed { flow, .. }
                    if *flow == w.real[i] =>
                {
                    panic!("side {i}: the real flow ended: {e:?}")
                }
                _ => {}
            }
        }
        assert!(side.expect.is_empty(), "side {i}: {} messages never arrived", side.expect.len());
        assert_eq!(w.eps[i].half_open_count(), 0, "side {i}: half-open flows left");
        let info = w.eps[i].flow_info(w.real[i]).expect("the real flow is gone");
        assert_eq!(info.state, FlowState::Established);
        assert_eq!((info.in_flight, info.queued), (0, 0), "side {i}: the real flow is not idle");
    }
    for i in 0..2 {
        let ids: Vec<FlowId> = w.eps[i].flows().map(|f| f.id).collect();
        let now = w.now;
        let (ep, side) = (&mut w.eps[i], &mut w.sides[i]);
        for f in ids {
            ep.abort(now, side, f).unwrap();
        }
        while let Some((_, msg)) = side.inbox.pop_front() {
            side.free_rx_chain(OWNER, msg.head, msg.count);
        }
        assert_eq!(side.in_use(), 0, "side {i}: segments leaked");
    }
});
