//! Embedding the Machnet transport without the standard library.
//!
//! Two [`Endpoint`]s exchange a request and its reply over a tiny in-memory link, in one
//! thread, on a clock the caller supplies. The crate is `#![no_std]` and needs only `alloc`:
//! `scripts/test.sh` builds it for `x86_64-unknown-none`, and `tests/pair.rs` runs it on the
//! host. It shows what an embedder supplies (docs/architecture.md, "Without the standard
//! library"):
//!
//! 1. **Packet buffers and a port**: [`LinkPort`] implements [`Port`] over a shared queue pair
//!    and one [`Pool`] of [`HeapBuf`]s (a driver's DMA rings and buffers would go here).
//! 2. **Payload storage, delivery, timers and events**: [`Host`] implements [`Env`]: a slab
//!    of segments (the application's message buffers), an inbox, one timer slot per flow.
//! 3. **A clock**: [`run_pair`] calls the caller's `clock` once per turn; nothing else reads
//!    time. Virtual time (tests) and a hardware counter work alike.
//! 4. **Local ports**: each endpoint owns a plain [`LocalPorts`] bitmap (one endpoint per IP,
//!    no lock). Shards sharing an IP would share an allocator of their own instead.
//!
//! The loop is the one every embedder writes: receive a burst, [`Endpoint::handle`] each
//! frame, [`Endpoint::flush`] (acknowledgements, window updates, queued data), fire due
//! timers with [`Endpoint::on_timer`], transmit what the environment queued.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::net::Ipv4Addr;
use machnet_net::port::{Burst, Capabilities, HeapBuf, PacketBuf, Pool, Port, PortStats};
use machnet_net::time::Instant;
use machnet_net::wire::{classify, ChecksumCaps, EthernetAddress, Frame, FrameRepr, MsgFlags, FRAME_HEADER_LEN};
use machnet_transport::{
    Config, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, Seg,
};

// ------------------------------------------------------------------------------------------------
// 1. The link: two ports over one pair of queues and one buffer pool
// ------------------------------------------------------------------------------------------------

/// The shared state of a link: frames in flight each way and the free buffers.
struct Wire {
    /// `queues[i]`: frames sent by port `i`, not yet received by the other.
    queues: [VecDeque<HeapBuf>; 2],
    pool: Pool,
    queue_len: usize,
    /// Drop every n-th frame handed to `tx_burst` (0: none).
    drop_every: u32,
    sent: u32,
    dropped: u32,
}

/// One end of an in-memory link. Single-threaded: the ends share the link through an `Rc`.
pub struct LinkPort {
    id: usize,
    wire: Rc<RefCell<Wire>>,
    caps: Capabilities,
    stats: PortStats,
}

/// Sizes and faults of a [`link`].
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Packet buffers shared by both ends.
    pub buffers: usize,
    /// Bytes per buffer (largest frame).
    pub buf_size: usize,
    /// Frames each direction holds before `tx_burst` refuses more.
    pub queue_len: usize,
    /// Lose every n-th frame sent on the link (0: lose none), to exercise retransmission.
    pub drop_every: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig { buffers: 512, buf_size: 1536, queue_len: 256, drop_every: 0 }
    }
}

/// Two connected ports with the given MACs.
pub fn link(cfg: LinkConfig, mac_a: EthernetAddress, mac_b: EthernetAddress) -> (LinkPort, LinkPort) {
    let wire = Rc::new(RefCell::new(Wire {
        queues: [VecDeque::with_capacity(cfg.queue_len), VecDeque::with_capacity(cfg.queue_len)],
        pool: Pool::new(cfg.buffers, cfg.buf_size, cfg.buffers),
        queue_len: cfg.queue_len,
        drop_every: cfg.drop_every,
        sent: 0,
        dropped: 0,
    }));
    let end = |id, mac| LinkPort {
        id,
        wire: Rc::clone(&wire),
        caps: Capabilities { mac, mtu: 1500, queues: 1, rss: None, checksum: ChecksumCaps::software() },
        stats: PortStats::default(),
    };
    (end(0, mac_a), end(1, mac_b))
}

impl LinkPort {
    /// Frames the link lost so far (both directions).
    pub fn dropped(&self) -> u32 {
        self.wire.borrow().dropped
    }
}

impl Port for LinkPort {
    type Buf = HeapBuf;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn alloc(&mut self) -> Option<HeapBuf> {
        let b = self.wire.borrow_mut().pool.get();
        if b.is_none() {
            self.stats.alloc_failures += 1;
        }
        b
    }

    fn free(&mut self, buf: HeapBuf) {
        self.wire.borrow_mut().pool.put(buf);
    }

    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        let mut wire = self.wire.borrow_mut();
        let q = &mut wire.queues[1 - self.id];
        let n = out.remaining_capacity().min(q.len());
        for b in q.drain(..n) {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += b.len() as u64;
            out.push(b);
        }
        n
    }

    fn tx_burst(&mut self, pkts: &mut Burst<HeapBuf>) -> usize {
        let mut guard = self.wire.borrow_mut();
        let wire = &mut *guard;
        let room = wire.queue_len.saturating_sub(wire.queues[self.id].len());
        let n = pkts.len().min(room);
        for b in pkts.drain(..n) {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += b.len() as u64;
            wire.sent += 1;
            if wire.drop_every != 0 && wire.sent % wire.drop_every == 0 {
                wire.dropped += 1;
                wire.pool.put(b);
            } else {
                wire.queues[self.id].push_back(b);
            }
        }
        self.stats.tx_busy += pkts.len() as u64;
        n
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

// ------------------------------------------------------------------------------------------------
// 2. The environment: segments, delivery, transmit, timers, events
// ------------------------------------------------------------------------------------------------

const NO_SEG: Seg = Seg::MAX;

/// A slab of payload segments of `seg_size` bytes each, shared by transmit and receive.
struct Segs {
    seg_size: usize,
    data: Vec<u8>,
    len: Vec<u16>,
    flags: Vec<MsgFlags>,
    next: Vec<Seg>,
    free: Vec<Seg>,
    count: usize,
}

impl Segs {
    fn new(count: usize, seg_size: usize) -> Self {
        Segs {
            seg_size,
            data: vec![0; count * seg_size],
            len: vec![0; count],
            flags: vec![MsgFlags::empty(); count],
            next: vec![NO_SEG; count],
            free: (0..count as Seg).rev().collect(),
            count,
        }
    }
    fn take(&mut self, bytes: &[u8], flags: MsgFlags) -> Option<Seg> {
        let s = self.free.pop()?;
        let i = s as usize;
        self.data[i * self.seg_size..i * self.seg_size + bytes.len()].copy_from_slice(bytes);
        self.len[i] = bytes.len() as u16;
        self.flags[i] = flags;
        self.next[i] = NO_SEG;
        Some(s)
    }
    fn put(&mut self, s: Seg) {
        self.free.push(s);
    }
    fn bytes(&self, s: Seg) -> &[u8] {
        let i = s as usize;
        &self.data[i * self.seg_size..i * self.seg_size + usize::from(self.len[i])]
    }
    fn in_use(&self) -> usize {
        self.count - self.free.len()
    }
}

/// What one endpoint's [`Env`] is made of: a port, segment storage, an inbox for delivered
/// messages, one timer slot per flow and the events the endpoint reported.
pub struct Host<P: Port> {
    port: P,
    txq: Burst<P::Buf>,
    segs: Segs,
    inbox: VecDeque<(FlowId, InMsg)>,
    timers: Vec<Option<(FlowId, Instant)>>,
    events: VecDeque<Event>,
}

impl<P: Port> Host<P> {
    fn new(port: P, cfg: &Config, segments: usize) -> Self {
        Host {
            port,
            txq: Burst::new(),
            segs: Segs::new(segments, cfg.mss),
            inbox: VecDeque::new(),
            timers: vec![None; cfg.max_flows],
            events: VecDeque::new(),
        }
    }

    /// Hands queued frames to the port; what it refuses is dropped (the protocol retransmits).
    fn flush_tx(&mut self) {
        self.port.tx_burst(&mut self.txq);
        for b in self.txq.drain(..) {
            self.port.free(b);
        }
    }

    /// `bytes` as a chain of transmit segments, or `None` if the slab is too full.
    fn message(&mut self, bytes: &[u8]) -> Option<OutMsg> {
        let count = bytes.len().div_ceil(self.segs.seg_size).max(1);
        let (mut head, mut tail) = (NO_SEG, NO_SEG);
        for (i, chunk) in bytes.chunks(self.segs.seg_size).enumerate() {
            let Some(s) = self.segs.take(chunk, MsgFlags::for_fragment(i, count)) else {
                self.free_chain(head, i as u32);
                return None;
            };
            if tail == NO_SEG {
                head = s;
            } else {
                self.segs.next[tail as usize] = s;
            }
            tail = s;
        }
        Some(OutMsg { head, tail, count: count as u32, len: bytes.len() as u32 })
    }

    /// Copies a delivered message out and frees its segments.
    fn read(&mut self, msg: &InMsg) -> Vec<u8> {
        let mut out = Vec::with_capacity(msg.len as usize);
        let mut s = msg.head;
        for _ in 0..msg.count {
            out.extend_from_slice(self.segs.bytes(s));
            s = self.segs.next[s as usize];
        }
        self.free_chain(msg.head, msg.count);
        out
    }

    fn free_chain(&mut self, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let n = self.segs.next[s as usize];
            self.segs.put(s);
            s = n;
        }
    }
}

impl<P: Port> Env for Host<P> {
    fn alloc_rx(&mut self, _owner: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg> {
        self.segs.take(payload, flags)
    }
    fn link_rx(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        self.segs.next[prev as usize] = next;
    }
    fn free_rx(&mut self, _owner: Owner, seg: Seg) {
        self.segs.put(seg);
    }
    fn free_rx_chain(&mut self, _owner: Owner, head: Seg, count: u32) {
        self.free_chain(head, count);
    }
    fn deliver(&mut self, _owner: Owner, flow: FlowId, _tuple: &FlowTuple, msg: &InMsg) -> bool {
        self.inbox.push_back((flow, *msg));
        true
    }
    fn tx_meta(&self, _owner: Owner, seg: Seg) -> (usize, MsgFlags) {
        (usize::from(self.segs.len[seg as usize]), self.segs.flags[seg as usize])
    }
    fn tx_next(&self, _owner: Owner, seg: Seg) -> Option<Seg> {
        let n = self.segs.next[seg as usize];
        (n != NO_SEG).then_some(n)
    }
    fn tx_link(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        self.segs.next[prev as usize] = next;
    }
    fn free_tx(&mut self, _owner: Owner, seg: Seg) {
        self.segs.put(seg);
    }
    fn transmit(&mut self, _owner: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        let Some(mut buf) = self.port.alloc() else { return false };
        let n = match payload {
            Some(s) => {
                let bytes = self.segs.bytes(s);
                buf.storage_mut()[FRAME_HEADER_LEN..FRAME_HEADER_LEN + bytes.len()].copy_from_slice(bytes);
                bytes.len()
            }
            None => 0,
        };
        let caps = self.port.capabilities().checksum;
        let Ok(len) = frame.emit(buf.storage_mut(), n, caps) else {
            self.port.free(buf);
            return false;
        };
        buf.set_len(len);
        self.txq.push(buf);
        if self.txq.is_full() {
            self.flush_tx();
        }
        true
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timers[flow.index() as usize] = at.map(|t| (flow, t));
    }
    fn event(&mut self, _owner: Owner, event: Event) {
        self.events.push_back(event);
    }
}

/// An endpoint with its environment.
struct Node {
    ep: Endpoint<LocalPorts>,
    host: Host<LinkPort>,
}

impl Node {
    fn new(port: LinkPort, ip: Ipv4Addr, cfg: Config, segments: usize) -> Result<Self, &'static str> {
        let local = LocalAddr { mac: port.capabilities().mac, ip };
        Ok(Node { host: Host::new(port, &cfg, segments), ep: Endpoint::new(cfg, local, LocalPorts::new())? })
    }

    /// One turn of the loop at `now`.
    fn poll(&mut self, now: Instant) {
        let mut burst = Burst::new();
        while self.host.port.rx_burst(&mut burst) > 0 {
            let caps = self.host.port.capabilities().checksum;
            for b in burst.drain(..) {
                if let Ok(Frame::Machnet(m)) = classify(b.frame(), caps) {
                    self.ep.handle(now, &mut self.host, &m);
                }
                self.host.port.free(b);
            }
            self.ep.flush(now, &mut self.host);
        }
        for t in 0..self.host.timers.len() {
            if let Some((flow, at)) = self.host.timers[t] {
                if at <= now {
                    self.host.timers[t] = None;
                    self.ep.on_timer(now, &mut self.host, flow);
                }
            }
        }
        self.ep.flush(now, &mut self.host);
        self.host.flush_tx();
    }
}

// ------------------------------------------------------------------------------------------------
// 3. The exchange
// ------------------------------------------------------------------------------------------------

/// What [`run_pair`] does.
#[derive(Debug, Clone, Copy)]
pub struct PairConfig {
    /// The link between the endpoints.
    pub link: LinkConfig,
    /// Request length in bytes (the reply has the same length); more than one MSS makes a
    /// multi-packet message.
    pub message_len: usize,
    /// Turns of the loop before giving up.
    pub max_turns: u64,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig { link: LinkConfig::default(), message_len: 4000, max_turns: 1_000_000 }
    }
}

/// What happened in a completed [`run_pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairReport {
    /// Turns of the loop (one clock reading each) until both flows were gone.
    pub turns: u64,
    /// Frames the link lost.
    pub frames_dropped: u32,
    /// DATA retransmissions plus SYN / SYN-ACK retransmissions, both endpoints.
    pub retransmissions: u64,
    /// Retransmission timeouts that fired, both endpoints.
    pub timeouts: u64,
    /// Time between the first and the last clock reading.
    pub elapsed_ns: u64,
}

/// Why a [`run_pair`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairError {
    /// The transport configuration was refused.
    Config(&'static str),
    /// A listen, connect, send or close was refused.
    Transport(machnet_transport::Error),
    /// The request or the reply arrived with other bytes than were sent.
    Corrupted,
    /// Not finished after `max_turns`.
    Timeout,
    /// An event nobody expected (a failed connect, a reset flow).
    Unexpected(Event),
    /// Segments still held after both flows were gone.
    Leak,
}

const OWNER: Owner = 1;
const PORT: u16 = 888;
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

/// Byte `i` of the request; the reply is its complement.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 7)) as u8
}

/// Runs the exchange: B listens, A connects and sends a request of `cfg.message_len` bytes, B
/// checks it and replies with its complement, A checks the reply and closes; done when both
/// endpoints have no flows and every segment is back. `clock` gives the time of each turn;
/// it must not go backwards and must advance (timers fire on it).
pub fn run_pair(clock: &mut dyn FnMut() -> Instant, cfg: PairConfig) -> Result<PairReport, PairError> {
    let tcfg = Config { max_flows: 4, ..Config::default() };
    // Room for a request and a reply in flight, with every fragment, on each side.
    let segments = 4 * cfg.message_len.div_ceil(tcfg.mss).max(1) + 64;
    let (pa, pb) = link(cfg.link, MAC_A, MAC_B);
    let mut a = Node::new(pa, IP_A, Config { seed: 1, ..tcfg }, segments).map_err(PairError::Config)?;
    let mut b = Node::new(pb, IP_B, Config { seed: 2, ..tcfg }, segments).map_err(PairError::Config)?;
    let request: Vec<u8> = (0..cfg.message_len).map(pattern).collect();
    let reply: Vec<u8> = request.iter().map(|x| !x).collect();

    let start = clock();
    b.ep.listen(OWNER, PORT).map_err(PairError::Transport)?;
    a.ep.connect(start, &mut a.host, OWNER, IP_B, MAC_B, PORT, 42).map_err(PairError::Transport)?;
    a.host.flush_tx();

    let (mut replied, mut closing) = (false, false);
    for turn in 1..=cfg.max_turns {
        let now = clock();
        a.poll(now);
        b.poll(now);
        while let Some(ev) = a.host.events.pop_front() {
            match ev {
                Event::Connected { flow, token: 42, .. } => {
                    let msg = a.host.message(&request).ok_or(PairError::Leak)?;
                    a.ep.send(&mut a.host, flow, &msg).map_err(PairError::Transport)?;
                }
                Event::Closed { .. } => {}
                other => return Err(PairError::Unexpected(other)),
            }
        }
        while let Some(ev) = b.host.events.pop_front() {
            match ev {
                Event::Accepted { .. } | Event::PeerClosed { .. } => {}
                other => return Err(PairError::Unexpected(other)),
            }
        }
        if let Some((flow, msg)) = b.host.inbox.pop_front() {
            if b.host.read(&msg) != request || replied {
                return Err(PairError::Corrupted);
            }
            let out = b.host.message(&reply).ok_or(PairError::Leak)?;
            b.ep.send(&mut b.host, flow, &out).map_err(PairError::Transport)?;
            replied = true;
        }
        if let Some((flow, msg)) = a.host.inbox.pop_front() {
            if a.host.read(&msg) != reply || closing {
                return Err(PairError::Corrupted);
            }
            a.ep.close(now, &mut a.host, flow).map_err(PairError::Transport)?;
            closing = true;
        }
        a.host.flush_tx();
        b.host.flush_tx();
        if closing && a.ep.flow_count() == 0 && b.ep.flow_count() == 0 {
            b.ep.unlisten(OWNER, PORT).map_err(PairError::Transport)?;
            if a.host.segs.in_use() + b.host.segs.in_use() != 0 || a.ep.ports().in_use() + b.ep.ports().in_use() != 0 {
                return Err(PairError::Leak);
            }
            let (sa, sb) = (a.ep.stats(), b.ep.stats());
            return Ok(PairReport {
                turns: turn,
                frames_dropped: a.host.port.dropped(),
                retransmissions: sa.tx_retransmits + sb.tx_retransmits + sa.syn_retransmits + sb.syn_retransmits,
                timeouts: sa.rto_fired + sb.rto_fired,
                elapsed_ns: now.as_nanos() - start.as_nanos(),
            });
        }
    }
    Err(PairError::Timeout)
}
