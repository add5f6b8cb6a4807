//! A virtual-time simulation of two endpoints joined by fault-injecting in-memory ports.
//!
//! Each side has an [`Endpoint`], an environment ([`SimEnv`]) that stores segments in a slab,
//! queues delivered messages in an inbox of bounded capacity (the application's ring), keeps
//! one timer per flow, and transmits through a [`Faulty`] wrapper around a `mem` port. The
//! simulation advances virtual time from event to event: frame releases, timers and scheduled
//! application reads. Nothing depends on wall-clock time, so runs are deterministic.
//!
//! Messages carry a verifiable pattern: byte `j` of message `k` of stream `s` is
//! [`pattern_byte`]`(s, k, j)`; each side's checker knows the lengths it should receive and
//! verifies order, exactly-once delivery and content as messages arrive, without storing them.
#![allow(dead_code)]

use machnet_net::port::fault::{FaultConfig, Faulty};
use machnet_net::port::mem::{pair, MemConfig, MemPort};
use machnet_net::port::{Burst, HeapBuf, PacketBuf, Port};
use machnet_net::time::Instant;
use machnet_net::wire::{classify, ChecksumCaps, EthernetAddress, Frame, FrameRepr, MsgFlags, FRAME_HEADER_LEN};
use machnet_transport::{
    Config, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, RxAdmission, Seg,
};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

pub const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xa]);
pub const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xb]);
pub const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const OWNER: Owner = 7;
pub const SEG_SIZE: usize = 1418;

/// Byte `j` of message `k` of stream `s`.
#[inline]
pub fn pattern_byte(s: u64, k: u64, j: usize) -> u8 {
    let x = s.wrapping_mul(0x9e37_79b9).wrapping_add(k.wrapping_mul(131)).wrapping_add(j as u64 * 7);
    (x ^ (x >> 11)) as u8
}

pub const FREE: u8 = 0;
pub const TX: u8 = 1;
pub const RX: u8 = 2;

/// A slab of payload segments.
pub struct SegStore {
    data: Vec<u8>,
    len: Vec<u16>,
    flags: Vec<u8>,
    next: Vec<Seg>,
    state: Vec<u8>,
    free: Vec<Seg>,
    pub rx_in_use: usize,
    pub tx_in_use: usize,
    /// Receive segments allowed at once (the engine's receive pool).
    pub rx_limit: usize,
}

impl SegStore {
    pub fn new(n: usize, rx_limit: usize) -> Self {
        SegStore {
            data: vec![0; n * SEG_SIZE],
            len: vec![0; n],
            flags: vec![0; n],
            next: vec![Seg::MAX; n],
            state: vec![FREE; n],
            free: (0..n as Seg).rev().collect(),
            rx_in_use: 0,
            tx_in_use: 0,
            rx_limit,
        }
    }
    pub fn take(&mut self, kind: u8) -> Option<Seg> {
        let s = self.free.pop()?;
        assert_eq!(self.state[s as usize], FREE, "double allocation of segment {s}");
        self.state[s as usize] = kind;
        self.next[s as usize] = Seg::MAX;
        match kind {
            TX => self.tx_in_use += 1,
            _ => self.rx_in_use += 1,
        }
        Some(s)
    }
    pub fn put(&mut self, s: Seg, kind: u8) {
        let st = self.state[s as usize];
        assert_eq!(st, kind, "segment {s} freed as {kind} but is {st}");
        self.state[s as usize] = FREE;
        match kind {
            TX => self.tx_in_use -= 1,
            _ => self.rx_in_use -= 1,
        }
        self.free.push(s);
    }
    pub fn data_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SEG_SIZE..(i + 1) * SEG_SIZE]
    }
    pub fn set_meta(&mut self, i: usize, len: usize, flags: MsgFlags) {
        self.len[i] = len as u16;
        self.flags[i] = flags.bits();
    }
    pub fn meta(&self, s: Seg) -> (usize, MsgFlags) {
        (self.len[s as usize] as usize, MsgFlags::from_bits_retain(self.flags[s as usize]))
    }
    pub fn set_next(&mut self, prev: Seg, next: Seg) {
        self.next[prev as usize] = next;
    }
    pub fn next_of(&self, s: Seg) -> Seg {
        self.next[s as usize]
    }
    pub fn bytes(&self, s: Seg) -> &[u8] {
        let i = s as usize;
        &self.data[i * SEG_SIZE..i * SEG_SIZE + self.len[i] as usize]
    }
    pub fn in_use(&self) -> usize {
        self.rx_in_use + self.tx_in_use
    }
}

/// A delivered message waiting for the application.
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub flow: FlowId,
    pub msg: InMsg,
}

/// Per-flow expectations of the receiving application.
#[derive(Debug, Default)]
pub struct Checker {
    pub stream: u64,
    pub expect: VecDeque<usize>,
    pub received: u64,
    pub bytes: u64,
}

/// Decides whether to drop a frame.
pub type FrameFilter = Box<dyn FnMut(&FrameRepr) -> bool>;

pub struct SimEnv {
    pub port: Faulty<MemPort>,
    pub caps: ChecksumCaps,
    txq: Burst<HeapBuf>,
    pub segs: SegStore,
    pub timers: Vec<Option<(FlowId, Instant)>>,
    pub events: Vec<(Owner, Event)>,
    pub inbox: VecDeque<Delivered>,
    pub inbox_cap: usize,
    pub tx_dropped: u64,
    pub frames_sent: u64,
    /// Drops a frame when it returns true (selective loss for corner-case tests).
    pub filter: Option<FrameFilter>,
    /// Frames the filter dropped.
    pub filtered: u64,
    /// Receive-pool admission (as machnetd's channels have it), if set.
    pub admission: Option<RxAdmission>,
}

impl SimEnv {
    pub fn flush_tx(&mut self) {
        if self.txq.is_empty() {
            return;
        }
        self.port.tx_burst(&mut self.txq);
        for b in self.txq.drain(..) {
            self.tx_dropped += 1;
            self.port.free(b);
        }
    }
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.iter().flatten().map(|(_, t)| *t).min()
    }
}

impl Env for SimEnv {
    fn alloc_rx(&mut self, _owner: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg> {
        if self.segs.rx_in_use >= self.segs.rx_limit {
            return None;
        }
        let s = self.segs.take(RX)?;
        let i = s as usize;
        self.segs.data[i * SEG_SIZE..i * SEG_SIZE + payload.len()].copy_from_slice(payload);
        self.segs.len[i] = payload.len() as u16;
        self.segs.flags[i] = flags.bits();
        Some(s)
    }
    fn admit_rx(&mut self, _owner: Owner, flow: FlowId, completes: bool, now: Instant) -> bool {
        let free = self.segs.rx_limit.saturating_sub(self.segs.rx_in_use);
        self.admission.as_mut().is_none_or(|a| a.admit(flow, free, completes, now))
    }
    fn rx_released(&mut self, _owner: Owner, flow: FlowId) {
        if let Some(a) = self.admission.as_mut() {
            a.release(flow);
        }
    }
    fn link_rx(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        assert_eq!(self.segs.state[prev as usize], RX);
        assert_eq!(self.segs.state[next as usize], RX);
        self.segs.next[prev as usize] = next;
    }
    fn free_rx(&mut self, _owner: Owner, seg: Seg) {
        self.segs.put(seg, RX);
    }
    fn free_rx_chain(&mut self, _owner: Owner, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let n = self.segs.next[s as usize];
            self.segs.put(s, RX);
            s = n;
        }
    }
    fn deliver(&mut self, _owner: Owner, flow: FlowId, _tuple: &FlowTuple, msg: &InMsg) -> bool {
        if self.inbox.len() >= self.inbox_cap {
            return false;
        }
        self.inbox.push_back(Delivered { flow, msg: *msg });
        true
    }
    fn tx_meta(&self, _owner: Owner, seg: Seg) -> (usize, MsgFlags) {
        assert_eq!(self.segs.state[seg as usize], TX, "tx_meta on a non-TX segment");
        (self.segs.len[seg as usize] as usize, MsgFlags::from_bits_retain(self.segs.flags[seg as usize]))
    }
    fn tx_next(&self, _owner: Owner, seg: Seg) -> Option<Seg> {
        let n = self.segs.next[seg as usize];
        (n != Seg::MAX).then_some(n)
    }
    fn tx_link(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        self.segs.next[prev as usize] = next;
    }
    fn free_tx(&mut self, _owner: Owner, seg: Seg) {
        self.segs.put(seg, TX);
    }
    fn transmit(&mut self, _owner: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        if let Some(f) = self.filter.as_mut() {
            if f(frame) {
                self.filtered += 1;
                return true;
            }
        }
        let Some(mut buf) = self.port.alloc() else { return false };
        let n = match payload {
            Some(s) => {
                let bytes = self.segs.bytes(s);
                let n = bytes.len();
                buf.storage_mut()[FRAME_HEADER_LEN..FRAME_HEADER_LEN + n].copy_from_slice(bytes);
                n
            }
            None => 0,
        };
        let len = frame.emit(buf.storage_mut(), n, self.caps).expect("frame fits");
        buf.set_len(len);
        self.txq.push(buf);
        self.frames_sent += 1;
        if self.txq.is_full() {
            self.flush_tx();
        }
        true
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        let i = flow.index() as usize;
        if i >= self.timers.len() {
            panic!("flow index {i} beyond the timer table");
        }
        self.timers[i] = at.map(|t| (flow, t));
    }
    fn event(&mut self, owner: Owner, event: Event) {
        self.events.push((owner, event));
    }
}

pub struct Side {
    pub ep: Endpoint,
    pub env: SimEnv,
    pub checkers: Vec<(FlowId, Checker)>,
    /// Read one inbox message every this often (`None`: read everything at once).
    pub read_every: Option<Duration>,
    pub next_read: Instant,
    /// Accept messages on flows nobody expects (flows a forged peer opened), counting them in
    /// `strangers` instead of failing.
    pub allow_strangers: bool,
    /// Messages delivered on flows without a checker (with `allow_strangers`).
    pub strangers: u64,
    scratch: Vec<u8>,
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub transport: Config,
    /// Faults on frames from A to B.
    pub ab: FaultConfig,
    /// Faults on frames from B to A.
    pub ba: FaultConfig,
    /// Segments per side (TX and RX together).
    pub segs: usize,
    /// Receive segments per side.
    pub rx_segs: usize,
    /// Application inbox capacity (messages).
    pub inbox: usize,
    /// Transport seeds of A and B (they determine the ISNs).
    pub seeds: [u64; 2],
}

impl SimConfig {
    /// A clean 10 Gbit/s link with 5 us one-way delay.
    pub fn link(transport: Config) -> Self {
        let f = FaultConfig {
            delay: Duration::from_micros(5),
            rate_bps: Some(10_000_000_000),
            queue_bytes: 4 << 20,
            hold_capacity: 65_536,
            ..FaultConfig::default()
        };
        SimConfig {
            transport,
            ab: FaultConfig { seed: 11, ..f },
            ba: FaultConfig { seed: 12, ..f },
            segs: 40_000,
            rx_segs: 20_000,
            inbox: 1024,
            seeds: [1, 2],
        }
    }
    /// Applies the same faults both ways (seeds differ per direction).
    pub fn faults(mut self, drop: f64, reorder: f64, duplicate: f64, corrupt: f64, jitter: Duration) -> Self {
        for (f, seed) in [(&mut self.ab, 101), (&mut self.ba, 202)] {
            f.drop = drop;
            f.reorder = reorder;
            f.duplicate = duplicate;
            f.corrupt = corrupt;
            f.jitter = jitter;
            f.seed = seed;
        }
        self
    }
}

pub struct Sim {
    pub now: Instant,
    pub sides: [Side; 2],
    pub steps: u64,
    /// A side does nothing until this time (a process that is not scheduled): frames queue
    /// for it, its timers wait. On resuming it reads its input first, as the daemon's loop
    /// does, unless `timers_first`.
    pub paused_until: [Instant; 2],
    /// Resume with the timers before the input (the worst order for failure detection).
    pub timers_first: bool,
}

pub const A: usize = 0;
pub const B: usize = 1;

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mem = MemConfig { buffers: 8192, queue_len: 65_536, ..MemConfig::default() };
        let (pa, pb) = pair(mem, MAC_A, MAC_B);
        let make = |port: MemPort, fault: FaultConfig, mac, ip, seed| {
            let tcfg = Config { seed, ..cfg.transport };
            Side {
                ep: Endpoint::new(tcfg, LocalAddr { mac, ip }, LocalPorts::new()).expect("valid config"),
                env: SimEnv {
                    port: Faulty::new(port, fault),
                    caps: ChecksumCaps::software(),
                    txq: Burst::new(),
                    segs: SegStore::new(cfg.segs, cfg.rx_segs),
                    timers: vec![None; cfg.transport.max_flows],
                    events: Vec::new(),
                    inbox: VecDeque::with_capacity(cfg.inbox),
                    inbox_cap: cfg.inbox,
                    tx_dropped: 0,
                    frames_sent: 0,
                    filter: None,
                    admission: None,
                    filtered: 0,
                },
                checkers: Vec::new(),
                read_every: None,
                next_read: Instant::ZERO,
                allow_strangers: false,
                strangers: 0,
                scratch: Vec::with_capacity(9 << 20),
            }
        };
        Sim {
            now: Instant::from_micros(1),
            sides: [make(pa, cfg.ab, MAC_A, IP_A, cfg.seeds[0]), make(pb, cfg.ba, MAC_B, IP_B, cfg.seeds[1])],
            steps: 0,
            paused_until: [Instant::ZERO; 2],
            timers_first: false,
        }
    }

    /// Processes everything due at the current time on one side; true if anything happened.
    fn poll(&mut self, i: usize) -> bool {
        let now = self.now;
        if now < self.paused_until[i] {
            return false;
        }
        let timers_first = self.timers_first;
        let side = &mut self.sides[i];
        let mut progress = false;
        side.env.port.set_now(now);
        if timers_first {
            progress |= Self::fire_timers(side, now);
        }
        let mut burst = Burst::new();
        loop {
            side.env.port.rx_burst(&mut burst);
            if burst.is_empty() {
                break;
            }
            progress = true;
            for b in burst.drain(..) {
                if let Ok(Frame::Machnet(m)) = classify(b.frame(), side.env.caps) {
                    side.ep.handle(now, &mut side.env, &m);
                }
                side.env.port.free(b);
            }
            side.ep.flush(now, &mut side.env);
        }
        progress |= Self::fire_timers(side, now);
        // The application reads its inbox.
        if now >= side.next_read {
            let mut reads = 0;
            while let Some(d) = side.env.inbox.pop_front() {
                side.consume(d);
                side.ep.on_writable(OWNER);
                progress = true;
                reads += 1;
                if let Some(every) = side.read_every {
                    side.next_read = now + every;
                    let _ = reads;
                    break;
                }
            }
        }
        if progress || side.ep.has_work() {
            side.ep.flush(now, &mut side.env);
        }
        side.env.flush_tx();
        progress
    }

    /// Timers due now.
    fn fire_timers(side: &mut Side, now: Instant) -> bool {
        let mut fired = false;
        for t in 0..side.env.timers.len() {
            if let Some((flow, at)) = side.env.timers[t] {
                if at <= now {
                    side.env.timers[t] = None;
                    side.ep.on_timer(now, &mut side.env, flow);
                    fired = true;
                }
            }
        }
        fired
    }

    /// Runs everything due now, then advances to the next event. False if nothing is scheduled.
    pub fn step(&mut self) -> bool {
        self.step_capped(None)
    }

    /// Runs everything due now, then advances to the next event or to `cap`, whichever is
    /// first.
    fn step_capped(&mut self, cap: Option<Instant>) -> bool {
        self.steps += 1;
        let mut rounds = 0;
        loop {
            // Release what is due on both links first, so each side sees frames its peer's
            // delay line let go at this instant.
            let now = self.now;
            for s in &mut self.sides {
                s.env.port.set_now(now);
            }
            let progress = self.poll(A) | self.poll(B);
            let queued = (0..2).any(|i| now >= self.paused_until[i] && self.sides[i].env.port.inner().pending_rx() > 0);
            if !progress && !queued {
                break;
            }
            rounds += 1;
            assert!(rounds < 100_000, "livelock at {:?}", self.now);
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for (i, s) in self.sides.iter().enumerate() {
            consider(s.env.port.next_release());
            if self.now < self.paused_until[i] {
                consider(Some(self.paused_until[i]));
                continue;
            }
            consider(s.env.next_timer());
            if !s.env.inbox.is_empty() {
                consider(Some(s.next_read));
            }
            if s.ep.has_work() {
                consider(Some(self.now + Duration::from_nanos(100)));
            }
        }
        if let Some(c) = cap {
            next = Some(next.map_or(c, |n: Instant| n.min(c)));
        }
        match next {
            Some(t) => {
                self.now = t.max(self.now + Duration::from_nanos(1));
                true
            }
            None => false,
        }
    }

    /// Steps until `done` or `limit` of virtual time passes; true if `done`.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now > end || !self.step() {
                return done(self);
            }
        }
    }

    /// Runs everything due in the next `span` of virtual time and stops at its end exactly.
    pub fn run_for(&mut self, span: Duration) {
        let end = self.now + span;
        while self.now < end {
            self.step_capped(Some(end));
        }
    }

    /// Starts a connect from A to B:`port` without waiting.
    pub fn start_connect(&mut self, port: u16, token: u64) -> FlowId {
        let now = self.now;
        let a = &mut self.sides[A];
        let f = a.ep.connect(now, &mut a.env, OWNER, IP_B, MAC_B, port, token).expect("connect");
        a.env.flush_tx();
        f
    }

    /// The first event on `side` matching `pred`.
    pub fn event(&self, side: usize, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        self.sides[side].env.events.iter().map(|(_, e)| *e).find(|e| pred(e))
    }

    /// Drops frames sent by `side` for which `f` returns true.
    pub fn drop_from(&mut self, side: usize, f: impl FnMut(&FrameRepr) -> bool + 'static) {
        self.sides[side].env.filter = Some(Box::new(f));
    }

    /// Listens on B:`port`, connects from A, runs until both sides are established.
    pub fn connect(&mut self, port: u16) -> (FlowId, FlowId) {
        let now = self.now;
        self.sides[B].ep.listen(OWNER, port).expect("listen");
        let b = &mut self.sides[A];
        let fa = b.ep.connect(now, &mut b.env, OWNER, IP_B, MAC_B, port, 99).expect("connect");
        b.env.flush_tx();
        let ok = self.run_until(Duration::from_secs(5), |s| {
            s.sides[A].env.events.iter().any(|(_, e)| matches!(e, Event::Connected { .. }))
                && s.sides[B].env.events.iter().any(|(_, e)| matches!(e, Event::Accepted { .. }))
        });
        assert!(ok, "handshake did not complete: A {:?} B {:?}", self.sides[A].env.events, self.sides[B].env.events);
        let fb = self.sides[B]
            .env
            .events
            .iter()
            .find_map(|(_, e)| match e {
                Event::Accepted { flow, .. } => Some(*flow),
                _ => None,
            })
            .unwrap();
        self.sides[A].env.events.clear();
        self.sides[B].env.events.clear();
        (fa, fb)
    }

    /// Sends message `k` of `stream` (pattern content, `len` bytes) from `side` on `flow`, and
    /// tells the other side's checker for `peer_flow` to expect it.
    pub fn send(
        &mut self,
        side: usize,
        flow: FlowId,
        peer_flow: FlowId,
        stream: u64,
        k: u64,
        len: usize,
    ) -> Result<(), machnet_transport::Error> {
        self.send_unchecked(side, flow, stream, k, len)?;
        let other = &mut self.sides[1 - side];
        other.checker(peer_flow, stream).expect.push_back(len);
        Ok(())
    }

    /// As [`send`](Self::send), with no checker told (for a peer flow not known yet: the other
    /// side counts the message as a stranger if it allows them).
    pub fn send_unchecked(
        &mut self,
        side: usize,
        flow: FlowId,
        stream: u64,
        k: u64,
        len: usize,
    ) -> Result<(), machnet_transport::Error> {
        let s = &mut self.sides[side];
        let count = len.div_ceil(SEG_SIZE);
        let mut head = Seg::MAX;
        let mut prev = Seg::MAX;
        for idx in 0..count {
            let seg = s.env.segs.take(TX).expect("sender segment pool exhausted");
            let off = idx * SEG_SIZE;
            let n = (len - off).min(SEG_SIZE);
            let base = seg as usize * SEG_SIZE;
            for j in 0..n {
                s.env.segs.data[base + j] = pattern_byte(stream, k, off + j);
            }
            s.env.segs.len[seg as usize] = n as u16;
            s.env.segs.flags[seg as usize] = MsgFlags::for_fragment(idx, count).bits();
            if prev == Seg::MAX {
                head = seg;
            } else {
                s.env.segs.next[prev as usize] = seg;
            }
            prev = seg;
        }
        let msg = OutMsg { head, tail: prev, count: count as u32, len: len as u32 };
        match s.ep.send(&mut s.env, flow, &msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut x = head;
                for _ in 0..count {
                    let n = s.env.segs.next[x as usize];
                    s.env.segs.put(x, TX);
                    x = n;
                }
                Err(e)
            }
        }
    }

    pub fn delivered(&self, side: usize, flow: FlowId) -> u64 {
        self.sides[side].checkers.iter().find(|(f, _)| *f == flow).map_or(0, |(_, c)| c.received)
    }

    pub fn pending(&self, side: usize, flow: FlowId) -> usize {
        self.sides[side].checkers.iter().find(|(f, _)| *f == flow).map_or(0, |(_, c)| c.expect.len())
    }
}

impl Side {
    pub fn checker(&mut self, flow: FlowId, stream: u64) -> &mut Checker {
        if let Some(i) = self.checkers.iter().position(|(f, _)| *f == flow) {
            return &mut self.checkers[i].1;
        }
        self.checkers.push((flow, Checker { stream, ..Checker::default() }));
        &mut self.checkers.last_mut().unwrap().1
    }

    /// Reads a delivered message: verifies it against the checker, frees its segments.
    fn consume(&mut self, d: Delivered) {
        let mut buf = core::mem::take(&mut self.scratch);
        buf.clear();
        let mut s = d.msg.head;
        for i in 0..d.msg.count {
            buf.extend_from_slice(self.env.segs.bytes(s));
            let flags = self.env.segs.flags[s as usize];
            let expect = MsgFlags::for_fragment(i as usize, d.msg.count as usize).bits();
            assert_eq!(flags & 0x07, expect, "fragment flags of segment {i}");
            s = self.env.segs.next[s as usize];
        }
        assert_eq!(buf.len(), d.msg.len as usize, "message length vs segments");
        let Some(idx) = self.checkers.iter().position(|(f, _)| *f == d.flow) else {
            assert!(self.allow_strangers, "message on a flow nobody expects");
            self.strangers += 1;
            self.env.free_rx_chain(OWNER, d.msg.head, d.msg.count);
            self.scratch = buf;
            return;
        };
        let c = &mut self.checkers[idx].1;
        let want =
            c.expect.pop_front().unwrap_or_else(|| panic!("unexpected extra message #{} on {:?}", c.received, d.flow));
        assert_eq!(buf.len(), want, "message #{} length", c.received);
        let (stream, k) = (c.stream, c.received);
        for (j, b) in buf.iter().enumerate() {
            if *b != pattern_byte(stream, k, j) {
                panic!("message #{k} byte {j} is {b:#x}, expected {:#x}", pattern_byte(stream, k, j));
            }
        }
        c.received += 1;
        c.bytes += buf.len() as u64;
        self.env.free_rx_chain(OWNER, d.msg.head, d.msg.count);
        self.scratch = buf;
    }
}

impl Sim {
    /// Hands `side`'s endpoint a frame as if it had arrived now (a forged packet from a host
    /// that is not in the simulation). Its answers go out on `side`'s link.
    pub fn inject(&mut self, side: usize, repr: &FrameRepr) {
        let mut buf = [0u8; FRAME_HEADER_LEN];
        let caps = ChecksumCaps::software();
        let len = repr.emit(&mut buf, 0, caps).expect("emit");
        let now = self.now;
        let s = &mut self.sides[side];
        if let Ok(Frame::Machnet(m)) = classify(&buf[..len], caps) {
            s.ep.handle(now, &mut s.env, &m);
            s.ep.flush(now, &mut s.env);
            s.env.flush_tx();
        } else {
            panic!("forged frame does not parse");
        }
    }

    /// Hands `side`'s endpoint raw frame bytes as if they had arrived now, classified as the
    /// link's frames are: what is not a Machnet frame (garbage, ARP, ICMP) goes no further.
    /// Returns whether the endpoint saw it.
    pub fn inject_bytes(&mut self, side: usize, frame: &[u8]) -> bool {
        let now = self.now;
        let s = &mut self.sides[side];
        let Ok(Frame::Machnet(m)) = classify(frame, s.env.caps) else { return false };
        s.ep.handle(now, &mut s.env, &m);
        s.ep.flush(now, &mut s.env);
        s.env.flush_tx();
        true
    }
}
