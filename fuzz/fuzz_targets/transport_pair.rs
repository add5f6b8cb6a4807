//! Two transport endpoints driven by arbitrary sequences of events: frames delivered, dropped,
//! duplicated or reordered; time advanced (timers fire); messages sent; flows closed or
//! aborted; the receiving application stalling; and, in hostile mode, forged packets.
//!
//! Invariants: no panic; every segment is accounted for (the environment asserts on double
//! frees and foreign segments, and everything is free once the flows are gone); in honest mode
//! the messages each flow delivered are a prefix of those sent on it, in order, intact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machnet_net::time::Instant;
use machnet_net::wire::{EthernetAddress, FrameRepr, MachnetFrame, MachnetRepr, MsgFlags, PacketType, SackBitmap};
use machnet_transport::cc::CcConfig;
use machnet_transport::{Config, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, Seg};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

const MSS: usize = 64;
const SEGS: usize = 4096;
const OWNER: Owner = 1;

#[derive(Clone, Copy, PartialEq)]
enum State {
    Free,
    Tx,
    Rx,
}

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
    inbox_cap: usize,
    /// Per flow: lengths and stream of messages it must deliver (sent by the peer).
    expect: Vec<(FlowId, u64, VecDeque<usize>, u64)>,
}

impl Side {
    fn new() -> Self {
        Side {
            data: vec![[0; MSS]; SEGS],
            len: vec![0; SEGS],
            flags: vec![MsgFlags::empty(); SEGS],
            next: vec![Seg::MAX; SEGS],
            state: vec![State::Free; SEGS],
            free: (0..SEGS as Seg).rev().collect(),
            out: VecDeque::new(),
            timers: vec![None; 8],
            events: Vec::new(),
            inbox: VecDeque::new(),
            inbox_cap: 4,
            expect: Vec::new(),
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
        if self.free.len() < 64 {
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
        if self.inbox.len() >= self.inbox_cap {
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

fn pattern(stream: u64, k: u64, j: usize) -> u8 {
    (stream.wrapping_mul(31) ^ k.wrapping_mul(131) ^ (j as u64 * 7)) as u8
}

fn endpoint(mac: EthernetAddress, ip: Ipv4Addr, seed: u64, cc: CcConfig) -> Endpoint {
    let cfg = Config { mss: MSS, max_flows: 8, window: 32, max_message: 64 * MSS, cc, seed, ..Config::default() };
    Endpoint::new(cfg, LocalAddr { mac, ip }, LocalPorts::new()).unwrap()
}

struct World {
    eps: [Endpoint; 2],
    sides: [Side; 2],
    now: Instant,
    hostile: bool,
    /// Established flow pairs (A's flow, B's flow), with per-direction message counters.
    pairs: Vec<(FlowId, FlowId, u64, u64)>,
}

impl World {
    fn deliver(&mut self, from: usize, dup: bool) {
        let Some((frame, payload)) =
            (if dup { self.sides[from].out.front().cloned() } else { self.sides[from].out.pop_front() })
        else {
            return;
        };
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

    fn advance(&mut self, us: u64) {
        self.now += Duration::from_micros(us);
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
    }

    fn read(&mut self, i: usize) {
        let honest = !self.hostile;
        let (ep, side) = (&mut self.eps[i], &mut self.sides[i]);
        while let Some((flow, msg)) = side.inbox.pop_front() {
            let mut bytes = Vec::new();
            let mut s = msg.head;
            for _ in 0..msg.count {
                bytes.extend_from_slice(&side.data[s as usize][..side.len[s as usize]]);
                s = side.next[s as usize];
            }
            assert_eq!(bytes.len(), msg.len as usize);
            if honest {
                let e = side.expect.iter_mut().find(|e| e.0 == flow).expect("message on an unknown flow");
                let want = e.2.pop_front().expect("more messages than were sent");
                assert_eq!(bytes.len(), want, "message length");
                for (j, b) in bytes.iter().enumerate() {
                    assert_eq!(*b, pattern(e.1, e.3, j), "message content");
                }
                e.3 += 1;
            }
            side.free_rx_chain(OWNER, msg.head, msg.count);
            ep.on_writable(OWNER);
        }
        ep.flush(self.now, side);
    }

    fn send(&mut self, pair: usize, dir: usize, len: usize) {
        let Some(&(fa, fb, ka, kb)) = self.pairs.get(pair) else { return };
        let (flow, peer_flow, k) = if dir == 0 { (fa, fb, ka) } else { (fb, fa, kb) };
        // Stable for the pair's life (pair indices shift as pairs end).
        let stream = (u64::from(fa.index()) << 33) | (u64::from(fa.generation()) << 1) | dir as u64;
        let (ep, side) = (&mut self.eps[dir], &mut self.sides[dir]);
        let count = len.div_ceil(MSS);
        if side.free.len() < count + 64 {
            return;
        }
        let mut segs = Vec::new();
        for i in 0..count {
            let s = side.take(State::Tx).unwrap();
            let n = (len - i * MSS).min(MSS);
            for j in 0..n {
                side.data[s as usize][j] = pattern(stream, k, i * MSS + j);
            }
            side.len[s as usize] = n;
            side.flags[s as usize] = MsgFlags::for_fragment(i, count);
            if let Some(&p) = segs.last() {
                side.next[p as usize] = s;
            }
            segs.push(s);
        }
        let msg = OutMsg { head: segs[0], tail: *segs.last().unwrap(), count: count as u32, len: len as u32 };
        let sent = ep.send(side, flow, &msg).is_ok();
        if sent {
            ep.flush(self.now, side);
        } else {
            for s in segs {
                side.put(s, State::Tx);
            }
            return;
        }
        {
            let peer = &mut self.sides[1 - dir];
            match peer.expect.iter_mut().find(|e| e.0 == peer_flow) {
                Some(e) => e.2.push_back(len),
                None => peer.expect.push((peer_flow, stream, VecDeque::from([len]), 0)),
            }
            let p = &mut self.pairs[pair];
            if dir == 0 {
                p.2 += 1;
            } else {
                p.3 += 1;
            }
        }
    }

    /// Records pairs whose both ends are established.
    fn adopt(&mut self) {
        let connected: Vec<(FlowId, u16)> = self.sides[0]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Connected { flow, tuple, .. } => Some((*flow, tuple.local_port)),
                _ => None,
            })
            .collect();
        for (fa, port) in connected {
            if self.pairs.iter().any(|p| p.0 == fa) || self.eps[0].flow_info(fa).is_none() {
                continue;
            }
            let fb = self.eps[1].flows().find(|f| f.tuple.remote_port == port).map(|f| (f.id, f.state));
            if let Some((fb, machnet_transport::FlowState::Established)) = fb {
                self.pairs.push((fa, fb, 0, 0));
            }
        }
        let eps = &self.eps;
        self.pairs.retain(|p| eps[0].flow_info(p.0).is_some() && eps[1].flow_info(p.1).is_some());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut it = data.iter().copied();
    let mode = it.next().unwrap_or(0);
    let cc =
        if mode & 2 != 0 { CcConfig::Fixed { window: 1 + u32::from(mode >> 2) % 32 } } else { CcConfig::default() };
    let a_ip = Ipv4Addr::new(198, 18, 0, 1);
    let b_ip = Ipv4Addr::new(198, 18, 0, 2);
    let mut w = World {
        eps: [
            endpoint(EthernetAddress([2, 0, 0, 0, 0, 1]), a_ip, 1, cc),
            endpoint(EthernetAddress([2, 0, 0, 0, 0, 2]), b_ip, 2, cc),
        ],
        sides: [Side::new(), Side::new()],
        now: Instant::from_micros(1),
        hostile: mode & 1 != 0,
        pairs: Vec::new(),
    };
    w.eps[1].listen(OWNER, 888).unwrap();
    let mut steps = 0;
    while let Some(op) = it.next() {
        steps += 1;
        if steps > 2000 {
            break;
        }
        let arg = it.next().unwrap_or(0);
        match op % 16 {
            0..=3 => w.deliver(usize::from(op & 1), false),
            4 => w.deliver(usize::from(arg & 1), true),
            5 => {
                let side = &mut w.sides[usize::from(arg & 1)];
                side.out.pop_front();
            }
            6 => {
                let side = &mut w.sides[usize::from(arg & 1)];
                if side.out.len() >= 2 {
                    side.out.swap(0, 1);
                }
            }
            7 => w.advance(u64::from(arg) * 37),
            8 | 9 => {
                let len = 1 + usize::from(arg) * (1 + usize::from(op & 1) * 15);
                w.send(usize::from(arg >> 6), usize::from(op & 1), len.min(64 * MSS));
            }
            10 => w.read(usize::from(arg & 1)),
            11 => w.sides[1].inbox_cap = usize::from(arg % 8),
            12 => {
                if w.eps[0].flow_count() < 4 {
                    let now = w.now;
                    let _ = w.eps[0].connect(
                        now,
                        &mut w.sides[0],
                        OWNER,
                        b_ip,
                        EthernetAddress([2, 0, 0, 0, 0, 2]),
                        888,
                        u64::from(arg),
                    );
                }
            }
            13 => {
                if let Some(&(fa, fb, _, _)) = w.pairs.get(usize::from(arg >> 2) % 4) {
                    let now = w.now;
                    let (i, f) = if arg & 1 == 0 { (0, fa) } else { (1, fb) };
                    let (ep, side) = (&mut w.eps[i], &mut w.sides[i]);
                    let _ = if arg & 2 == 0 { ep.close(now, side, f) } else { ep.abort(now, side, f) };
                    ep.flush(now, side);
                }
            }
            _ if w.hostile => {
                // A forged packet from anywhere in the peer's port range to B (or A).
                let to = usize::from(arg & 1);
                let ty = PacketType::from(it.next().unwrap_or(0));
                let seqno = u32::from_le_bytes([it.next().unwrap_or(0), it.next().unwrap_or(0), 0, 0]);
                let ackno = u32::from_le_bytes([it.next().unwrap_or(0), it.next().unwrap_or(0), 0, 0]);
                let sack = SackBitmap([0, 0, 0, u64::from(it.next().unwrap_or(0))]);
                let flags = MsgFlags::from_bits_retain(it.next().unwrap_or(0));
                let len = usize::from(it.next().unwrap_or(0) % 80);
                let payload = vec![0x5a; len];
                let hdr =
                    MachnetRepr { packet_type: ty, msg_flags: flags, seqno, ackno, sack, sack_count: 3, timestamp: 7 };
                let (src_ip, dst_ip, dst_port) = if to == 1 { (a_ip, b_ip, 888) } else { (b_ip, a_ip, 1024) };
                let m = MachnetFrame {
                    src_mac: EthernetAddress([2, 0, 0, 0, 0, 9]),
                    dst_mac: EthernetAddress::BROADCAST,
                    src_ip,
                    dst_ip,
                    src_port: if to == 1 { 1024 + u16::from(arg >> 1) % 4 } else { 888 },
                    dst_port,
                    hdr,
                    payload: &payload,
                };
                let now = w.now;
                w.eps[to].handle(now, &mut w.sides[to], &m);
                w.eps[to].flush(now, &mut w.sides[to]);
            }
            _ => w.advance(1),
        }
        w.adopt();
    }
    // Wind down: everything aborted, every segment must be back.
    for i in 0..2 {
        // The application reads everything, including messages its reads unblock.
        while !w.sides[i].inbox.is_empty() || w.eps[i].has_blocked() {
            let before = w.sides[i].inbox.len();
            w.read(i);
            if before == 0 && w.sides[i].inbox.is_empty() {
                break;
            }
        }
        let ids: Vec<FlowId> = w.eps[i].flows().map(|f| f.id).collect();
        let now = w.now;
        let (ep, side) = (&mut w.eps[i], &mut w.sides[i]);
        for f in ids {
            ep.abort(now, side, f).unwrap();
        }
        assert_eq!(ep.flow_count(), 0);
        // Messages delivered before the abort are the application's; it reads them too.
        while let Some((_, msg)) = side.inbox.pop_front() {
            side.free_rx_chain(OWNER, msg.head, msg.count);
        }
        if side.in_use() != 0 {
            let leaked: Vec<(usize, bool)> =
                (0..SEGS).filter(|&s| side.state[s] != State::Free).map(|s| (s, side.state[s] == State::Tx)).collect();
            eprintln!("side {i} leaked (seg, is_tx): {leaked:?}; stats {:#?}", ep.stats());
        }
        assert_eq!(side.in_use(), 0, "segments leaked");
    }
});
