//! Embedded mode: the Machnet stack inside the application's own thread.
//!
//! An [`Embedded`] owns a port queue (any [`Port`]: a DPDK device, the udp tunnel, an in-memory
//! pair) and runs one shard's worth of the stack — transport endpoint, ARP, ICMP echo, timers —
//! whenever the application calls it. There is no daemon, no shared memory and no other thread:
//! `send` copies the message into the stack's transmit buffers and puts its first packets on
//! the wire before it returns — unless received messages are still waiting for `recv`, in
//! which case sends are batched until the application next finds nothing to receive or
//! [`EmbeddedConfig::send_batch`] of them are queued (answers to a burst of requests leave in
//! bursts; [`Embedded::flush`] sends at once); `recv` polls
//! the port and hands back a complete message. The stack runs only inside these calls: an
//! application that stops calling them stops acknowledging too. For appliances that own a
//! NIC, and for the lowest latency.
//!
//! The operations mirror the client library's ([`machnet::client::Channel`]): `listen`,
//! `connect`, `send`, `recv`, `close`, with the same flow type and errors. Received messages
//! carry the flow "from the peer to us", as on a channel.
//!
//! ```
//! use machnet_daemon::embedded::{Embedded, EmbeddedConfig};
//! use machnet_net::port::mem::{pair, MemConfig};
//! use std::net::Ipv4Addr;
//!
//! let (ma, mb) = ("02:00:00:00:00:01".parse().unwrap(), "02:00:00:00:00:02".parse().unwrap());
//! let (ia, ib) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
//! let (pa, pb) = pair(MemConfig::default(), ma, mb);
//! let mut a = Embedded::new(pa, EmbeddedConfig::new(ia)).unwrap();
//! let mut b = Embedded::new(pb, EmbeddedConfig::new(ib)).unwrap();
//! b.listen(ib, 888).unwrap();
//! // Both stacks live in this thread, so the connect has to be driven by polling both.
//! let token = a.start_connect(ia, ib, 888).unwrap();
//! let flow = loop {
//!     a.poll();
//!     b.poll();
//!     if let Some(r) = a.connect_result(token) {
//!         break r.unwrap();
//!     }
//! };
//! a.send(flow, b"hello").unwrap();
//! let mut buf = [0u8; 64];
//! let (n, from) = loop {
//!     a.poll();
//!     if let Some(m) = b.recv(&mut buf).unwrap() {
//!         break m;
//!     }
//! };
//! assert_eq!(&buf[..n], b"hello");
//! assert_eq!((from.src_port, from.dst_port), (flow.src_port, flow.dst_port)); // from A, to B
//! ```

use crate::arp::{ArpConfig, ArpTable, Learned, Resolve};
use crate::nic::{handle_frame, FlowTimers, PortTx, Rx};
use machnet::client::Error;
use machnet::layout::MachnetFlow;
use machnet::ops::Status;
use machnet_net::port::{Burst, PacketBuf, Port};
use machnet_net::time::Instant;
use machnet_net::wire::{ChecksumCaps, EthernetAddress, FrameRepr, MsgFlags};
use machnet_runtime::clock::Clock;
use machnet_transport::{
    ConnectError, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, RxAdmission,
    Seg,
};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

/// The one owner of every flow in an embedded stack.
const APP: Owner = 0;
const NIL: u32 = u32::MAX;
/// `send` and `recv` run a poll turn every this many segments they copy (about 45 KB), so
/// that a long message's copy does not stop the stack from acknowledging, or leave the peer's
/// ACKs waiting in the ring: an ACK read late is a round trip long by the wait, which Swift
/// takes for queueing. At 256 (about 360 KB) a 1 MiB window-8 transfer ran 20-25 % slower
/// (docs/performance.md, S6).
const POLL_EVERY: usize = 32;
/// Largest message.
pub const MAX_MSG: usize = 8 << 20;

/// How an embedded stack is set up.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// The IPv4 address of this stack (the port's MAC is its MAC).
    pub ip: Ipv4Addr,
    /// Transport parameters.
    pub transport: machnet_transport::Config,
    /// ARP behaviour.
    pub arp: ArpConfig,
    /// Static ARP entries.
    pub static_arp: Vec<(Ipv4Addr, EthernetAddress)>,
    /// Transmit buffers of one MSS each (default 12288: two 8 MiB messages).
    pub tx_segments: usize,
    /// Receive buffers of one MSS each (default 12288).
    pub rx_segments: usize,
    /// Complete messages held for `recv` before the stack stops acknowledging (default 4096).
    pub inbox: usize,
    /// Sends batched while received messages wait, at most (default 8; 0: no bound, they
    /// leave when the application next finds nothing to receive). The bound lets the peer
    /// start on the first answers while this side still works through the burst: at window
    /// 32 over memif the two sides otherwise take turns, each idle while the other works
    /// (S2 64 B window 32: 1.1M RPC/s unbounded, 2.0-3.0M with 8; docs/performance.md).
    pub send_batch: usize,
}

impl EmbeddedConfig {
    /// Defaults for `ip`.
    pub fn new(ip: Ipv4Addr) -> Self {
        EmbeddedConfig {
            ip,
            transport: machnet_transport::Config { max_flows: 1024, ..machnet_transport::Config::default() },
            arp: ArpConfig::default(),
            static_arp: Vec::new(),
            tx_segments: 12288,
            rx_segments: 12288,
            inbox: 4096,
            send_batch: 8,
        }
    }
}

/// Fixed-size payload buffers with a free list and chain links.
struct Segs {
    data: Vec<u8>,
    size: usize,
    len: Vec<u32>,
    next: Vec<u32>,
    flags: Vec<u8>,
    free: Vec<u32>,
}

impl Segs {
    fn new(n: usize, size: usize) -> Self {
        Segs {
            data: vec![0; n * size],
            size,
            len: vec![0; n],
            next: vec![NIL; n],
            flags: vec![0; n],
            free: (0..n as u32).rev().collect(),
        }
    }
    fn take(&mut self) -> Option<Seg> {
        let s = self.free.pop()?;
        self.next[s as usize] = NIL;
        Some(s)
    }
    fn put(&mut self, s: Seg) {
        if let Some(l) = self.len.get_mut(s as usize) {
            *l = 0;
            self.free.push(s);
        }
    }
    fn bytes(&self, s: Seg) -> &[u8] {
        let i = s as usize;
        &self.data[i * self.size..i * self.size + self.len[i] as usize]
    }
    fn slot_mut(&mut self, s: Seg) -> &mut [u8] {
        let i = s as usize;
        &mut self.data[i * self.size..(i + 1) * self.size]
    }
}

/// A complete message waiting for `recv`.
#[derive(Clone, Copy)]
struct Inbound {
    flow: MachnetFlow,
    msg: InMsg,
}

struct EmbEnv<P: Port> {
    nic: PortTx<P>,
    tx: Segs,
    rx: Segs,
    inbox: VecDeque<Inbound>,
    inbox_cap: usize,
    /// `deliver` found the inbox full: tell the endpoint when it drains.
    blocked: bool,
    events: VecDeque<Event>,
    timers: FlowTimers,
    /// Keeps the flows sharing the receive pool from deadlocking in reassembly.
    admission: RxAdmission,
}

fn from_peer(t: &FlowTuple) -> MachnetFlow {
    MachnetFlow {
        src_ip: t.remote_ip.to_bits(),
        dst_ip: t.local_ip.to_bits(),
        src_port: t.remote_port,
        dst_port: t.local_port,
    }
}

fn to_peer(t: &FlowTuple) -> MachnetFlow {
    MachnetFlow {
        src_ip: t.local_ip.to_bits(),
        dst_ip: t.remote_ip.to_bits(),
        src_port: t.local_port,
        dst_port: t.remote_port,
    }
}

fn tuple_of(f: &MachnetFlow) -> FlowTuple {
    FlowTuple {
        local_ip: Ipv4Addr::from_bits(f.src_ip),
        local_port: f.src_port,
        remote_ip: Ipv4Addr::from_bits(f.dst_ip),
        remote_port: f.dst_port,
    }
}

impl<P: Port> Env for EmbEnv<P> {
    fn alloc_rx(&mut self, _owner: Owner, payload: &[u8], _flags: MsgFlags) -> Option<Seg> {
        if payload.len() > self.rx.size {
            return None;
        }
        let s = self.rx.take()?;
        self.rx.slot_mut(s)[..payload.len()].copy_from_slice(payload);
        self.rx.len[s as usize] = payload.len() as u32;
        Some(s)
    }
    #[inline]
    fn admit_rx(&mut self, _owner: Owner, flow: FlowId, completes: bool, now: Instant) -> bool {
        self.admission.admit(flow, self.rx.free.len(), completes, now)
    }
    fn rx_released(&mut self, _owner: Owner, flow: FlowId) {
        self.admission.release(flow);
    }
    fn link_rx(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        if let Some(n) = self.rx.next.get_mut(prev as usize) {
            *n = next;
        }
    }
    fn free_rx(&mut self, _owner: Owner, seg: Seg) {
        self.rx.put(seg);
    }
    fn free_rx_chain(&mut self, _owner: Owner, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let next = self.rx.next.get(s as usize).copied().unwrap_or(NIL);
            self.rx.put(s);
            if next == NIL {
                break;
            }
            s = next;
        }
    }
    fn deliver(&mut self, _owner: Owner, _flow: FlowId, tuple: &FlowTuple, msg: &InMsg) -> bool {
        if self.inbox.len() >= self.inbox_cap {
            self.blocked = true;
            return false;
        }
        self.inbox.push_back(Inbound { flow: from_peer(tuple), msg: *msg });
        true
    }
    fn tx_meta(&self, _owner: Owner, seg: Seg) -> (usize, MsgFlags) {
        let i = seg as usize;
        match self.tx.len.get(i) {
            Some(&l) => (l as usize, MsgFlags::from_bits_retain(self.tx.flags[i])),
            None => (0, MsgFlags::empty()),
        }
    }
    fn tx_next(&self, _owner: Owner, seg: Seg) -> Option<Seg> {
        self.tx.next.get(seg as usize).copied().filter(|&n| n != NIL)
    }
    fn tx_link(&mut self, _owner: Owner, prev: Seg, next: Seg) {
        if let Some(n) = self.tx.next.get_mut(prev as usize) {
            *n = next;
        }
    }
    fn free_tx(&mut self, _owner: Owner, seg: Seg) {
        self.tx.put(seg);
    }
    fn transmit(&mut self, _owner: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        let tx = &self.tx;
        self.nic.send_frame(frame, |out| match payload {
            Some(seg) => {
                let b = tx.bytes(seg);
                out[..b.len()].copy_from_slice(b);
                b.len()
            }
            None => 0,
        })
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timers.set(flow, at);
    }
    fn event(&mut self, _owner: Owner, event: Event) {
        if self.events.len() < self.events.capacity() {
            self.events.push_back(event);
        }
    }
}

/// The outcome of a connect, kept until [`Embedded::connect_result`] takes it.
#[derive(Clone, Copy)]
struct Connect {
    token: u64,
    remote_ip: Ipv4Addr,
    remote_port: u16,
    /// `None` while waiting for ARP or the handshake.
    result: Option<Result<MachnetFlow, Error>>,
    /// Waiting for ARP.
    resolving: bool,
}

/// Counters of an embedded stack beyond the endpoint's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbeddedStats {
    /// Frames received that were not for this stack or did not parse.
    pub rx_dropped: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ICMP echo requests answered.
    pub icmp_replies: u64,
    /// Frames dropped for want of a transmit buffer.
    pub tx_dropped: u64,
}

/// The Machnet stack in the application's thread.
pub struct Embedded<P: Port> {
    ep: Endpoint,
    env: EmbEnv<P>,
    arp: ArpTable,
    local: LocalAddr,
    rx_caps: ChecksumCaps,
    clock: Clock,
    /// The receive burst, boxed so that taking it out for a loop moves a pointer, not 32
    /// buffers (`None` only while the loop runs).
    rx: Option<Box<Burst<P::Buf>>>,
    connects: Vec<Connect>,
    next_token: u64,
    stats: EmbeddedStats,
    scratch: (Vec<Ipv4Addr>, Vec<Ipv4Addr>),
    /// Messages `send` queued since the last flush.
    unflushed: usize,
    /// [`EmbeddedConfig::send_batch`] (`usize::MAX` for 0).
    send_batch: usize,
}

impl<P: Port> Embedded<P> {
    /// A stack on `port` (its MAC is the port's) for `cfg.ip`. Memory for every flow, buffer
    /// and queue is reserved here.
    pub fn new(port: P, cfg: EmbeddedConfig) -> Result<Self, String> {
        let caps = port.capabilities().clone();
        let local = LocalAddr { mac: caps.mac, ip: cfg.ip };
        let mss = cfg.transport.mss;
        let max_flows = cfg.transport.max_flows;
        let mut ep = Endpoint::new(cfg.transport, local, LocalPorts::new())
            .map_err(|e| format!("transport configuration: {e}"))?;
        ep.set_steering(caps.rss.as_ref().and_then(|r| r.build()), 0);
        let mut arp = ArpTable::new(cfg.arp);
        for &(ip, mac) in &cfg.static_arp {
            arp.add_static(ip, mac);
        }
        let clock = Clock::new();
        // The wheel is anchored at the current time (the clock is CLOCK_MONOTONIC-based).
        let now = Instant(machnet_runtime::clock::monotonic_ns());
        Ok(Embedded {
            ep,
            env: EmbEnv {
                nic: PortTx::new(port),
                tx: Segs::new(cfg.tx_segments, mss),
                rx: Segs::new(cfg.rx_segments, mss),
                inbox: VecDeque::with_capacity(cfg.inbox),
                inbox_cap: cfg.inbox,
                blocked: false,
                events: VecDeque::with_capacity(4 * max_flows + 64),
                timers: FlowTimers::new(max_flows, now),
                admission: RxAdmission::new(cfg.rx_segments, mss, cfg.transport.max_message),
            },
            rx_caps: caps.checksum,
            arp,
            local,
            clock,
            rx: Some(Box::new(Burst::new())),
            connects: Vec::with_capacity(64),
            next_token: 1,
            stats: EmbeddedStats::default(),
            scratch: (Vec::with_capacity(cfg.arp.capacity), Vec::with_capacity(cfg.arp.capacity)),
            unflushed: 0,
            send_batch: if cfg.send_batch == 0 { usize::MAX } else { cfg.send_batch },
        })
    }

    /// This stack's addresses.
    pub fn local(&self) -> LocalAddr {
        self.local
    }

    /// Transport counters.
    pub fn endpoint_stats(&self) -> &machnet_transport::EndpointStats {
        self.ep.stats()
    }

    /// Stack counters.
    pub fn stats(&self) -> EmbeddedStats {
        EmbeddedStats { tx_dropped: self.env.nic.dropped, ..self.stats }
    }

    /// A snapshot of each live flow (state, congestion window, RTTs, packets in flight).
    pub fn flows(&self) -> impl Iterator<Item = machnet_transport::FlowInfo> + '_ {
        self.ep.flows()
    }

    /// Live flows.
    pub fn flow_count(&self) -> usize {
        self.ep.flow_count()
    }

    /// The port.
    pub fn port(&self) -> &P {
        &self.env.nic.port
    }

    /// Runs the stack once: receives a burst, fires due timers, sends what the windows allow.
    /// Returns the work done (0: nothing happened).
    pub fn poll(&mut self) -> usize {
        let mut now = self.clock.now();
        self.env.nic.port.set_time(now);
        // What `send` left queued goes first.
        self.unflushed = 0;
        let built = self.env.nic.built;
        if self.ep.has_work() {
            self.ep.flush(now, &mut self.env);
        }
        // (A flush that built frames took time even when the device took none of them now: a
        // full ring, with the frames it did take sent from inside the flush.)
        if self.env.nic.flush() > 0 || self.env.nic.built != built {
            // Received frames are timed after the flush, sent ones before it: a flush of a
            // window of full frames takes tens of microseconds, and frames that arrived meanwhile
            // stamped with the turn's start would time their round trips short by that much (to
            // zero: the path's base RTT then read 1 ns and Swift held a bulk flow at its delay
            // floor; measured: S6, 1 MiB messages, window 8).
            now = self.clock.now();
            self.env.nic.port.set_time(now);
        }
        let mut rx = self.rx.take().expect("the receive burst is put back after every loop");
        let n = self.env.nic.port.rx_burst(&mut rx);
        for b in rx.drain(..) {
            let caps = if b.rx_checksum_good() { self.rx_caps.without_rx() } else { self.rx_caps };
            let rx_at = b.rx_timestamp().unwrap_or(now);
            match handle_frame(&mut self.env.nic, &mut self.arp, self.local, b.frame(), caps, now) {
                Rx::Machnet(m) => self.ep.handle_at(now, rx_at, &mut self.env, &m),
                Rx::Arp { ip, mac, learned, replied } => {
                    self.stats.arp_replies += u64::from(replied);
                    if let Some(learned) = learned {
                        self.on_learned(now, ip, mac, learned);
                    }
                }
                Rx::Icmp(replied) => self.stats.icmp_replies += u64::from(replied),
                Rx::Dropped => self.stats.rx_dropped += 1,
            }
            self.env.nic.port.free(b);
        }
        self.rx = Some(rx);
        let mut work = n;
        if self.env.timers.may_expire(now) {
            let fired = self.env.timers.expire(now);
            work += fired.len();
            for &f in &fired {
                self.ep.on_timer(now, &mut self.env, f);
            }
            self.env.timers.done(fired);
        }
        if self.ep.has_unanswered() {
            // (Collected first: the endpoint is borrowed while draining.)
            let unanswered: arrayvec::ArrayVec<Ipv4Addr, 64> = self.ep.take_unanswered().collect();
            for ip in unanswered {
                if self.arp.revalidate(ip, now) {
                    self.env.nic.send_arp_request(self.local, ip);
                }
            }
        }
        if self.arp.next_deadline().is_some_and(|d| d <= now) {
            let (mut send, mut failed) = core::mem::take(&mut self.scratch);
            let mut learned: arrayvec::ArrayVec<(Ipv4Addr, EthernetAddress, Learned), 16> = arrayvec::ArrayVec::new();
            self.arp.poll(now, |ip| send.push(ip), |ip| failed.push(ip), |ip, mac, l| learned.push((ip, mac, l)));
            for (ip, mac, l) in learned {
                self.on_learned(now, ip, mac, l);
            }
            for ip in send.drain(..) {
                self.env.nic.send_arp_request(self.local, ip);
            }
            for ip in failed.drain(..) {
                self.resolved(now, ip, None);
            }
            self.scratch = (send, failed);
        }
        if work > 0 || self.ep.has_work() {
            // Sent frames are stamped with when they leave, not when the turn began: processing
            // a burst of received frames takes as long as the flush above.
            let now = if n > 0 { self.clock.now() } else { now };
            self.ep.flush(now, &mut self.env);
        }
        self.env.nic.flush();
        self.take_events();
        work
    }

    /// An ARP reply did `learned` to the table.
    fn on_learned(&mut self, now: Instant, ip: Ipv4Addr, mac: EthernetAddress, learned: Learned) {
        match learned {
            Learned::Resolved => self.resolved(now, ip, Some(mac)),
            Learned::Changed => {
                self.ep.update_peer_mac(now, &mut self.env, ip, mac);
                self.resolved(now, ip, Some(mac));
            }
            Learned::Ignored => {}
        }
    }

    /// ARP finished for `ip`: start the waiting connects, or fail them.
    fn resolved(&mut self, now: Instant, ip: Ipv4Addr, mac: Option<EthernetAddress>) {
        for i in 0..self.connects.len() {
            let c = self.connects[i];
            if !c.resolving || c.remote_ip != ip {
                continue;
            }
            self.connects[i].resolving = false;
            match mac {
                Some(mac) => self.connect_now(now, i, mac),
                None => self.connects[i].result = Some(Err(Error::Daemon(Status::Unreachable))),
            }
        }
    }

    fn connect_now(&mut self, now: Instant, i: usize, mac: EthernetAddress) {
        let c = self.connects[i];
        if let Err(e) = self.ep.connect(now, &mut self.env, APP, c.remote_ip, mac, c.remote_port, c.token) {
            let st = match e {
                machnet_transport::Error::NoPortAvailable | machnet_transport::Error::TooManyFlows => {
                    Status::NoResources
                }
                _ => Status::Internal,
            };
            self.connects[i].result = Some(Err(Error::Daemon(st)));
        }
    }

    fn take_events(&mut self) {
        while let Some(ev) = self.env.events.pop_front() {
            match ev {
                Event::Connected { flow, tuple, token } => {
                    if let Some(c) = self.connects.iter_mut().find(|c| c.token == token) {
                        c.result = Some(Ok(to_peer(&tuple)));
                    } else {
                        // Its connect timed out and was abandoned: nobody will use the flow.
                        let now = self.clock.now();
                        let _ = self.ep.close(now, &mut self.env, flow);
                    }
                }
                Event::ConnectFailed { token, error } => {
                    if let Some(c) = self.connects.iter_mut().find(|c| c.token == token) {
                        c.result = Some(Err(Error::Daemon(match error {
                            ConnectError::Refused => Status::Refused,
                            ConnectError::Timeout => Status::TimedOut,
                        })));
                    }
                }
                _ => {}
            }
        }
    }

    /// Accepts connections on `ip:port` (`ip` must be this stack's, or 0.0.0.0).
    pub fn listen(&mut self, ip: Ipv4Addr, port: u16) -> Result<(), Error> {
        if ip != self.local.ip && !ip.is_unspecified() {
            return Err(Error::Daemon(Status::AddrNotLocal));
        }
        self.ep.listen(APP, port).map_err(|e| match e {
            machnet_transport::Error::PortInUse => Error::Daemon(Status::AddrInUse),
            _ => Error::Daemon(Status::NoResources),
        })
    }

    /// Starts a connection to `remote_ip:remote_port` and returns a token for
    /// [`connect_result`](Self::connect_result); the stack must be polled until then.
    pub fn start_connect(&mut self, local_ip: Ipv4Addr, remote_ip: Ipv4Addr, remote_port: u16) -> Result<u64, Error> {
        if local_ip != self.local.ip {
            return Err(Error::Daemon(Status::AddrNotLocal));
        }
        if remote_ip.is_unspecified() || remote_ip.is_broadcast() || remote_ip.is_multicast() || remote_port == 0 {
            return Err(Error::InvalidAddress);
        }
        let now = self.clock.now();
        let token = self.next_token;
        self.next_token += 1;
        self.connects.push(Connect { token, remote_ip, remote_port, result: None, resolving: false });
        let i = self.connects.len() - 1;
        match self.arp.resolve(remote_ip, now) {
            Resolve::Known(mac) => self.connect_now(now, i, mac),
            Resolve::SendRequest => {
                self.connects[i].resolving = true;
                self.env.nic.send_arp_request(self.local, remote_ip);
            }
            Resolve::InProgress => self.connects[i].resolving = true,
            Resolve::Full => self.connects[i].result = Some(Err(Error::Daemon(Status::NoResources))),
        }
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
        Ok(token)
    }

    /// The outcome of a connect started with `token`, once known (then forgotten).
    pub fn connect_result(&mut self, token: u64) -> Option<Result<MachnetFlow, Error>> {
        let i = self.connects.iter().position(|c| c.token == token && c.result.is_some())?;
        self.connects.swap_remove(i).result
    }

    /// Connects to `remote_ip:remote_port`, polling this stack until the handshake ends (the
    /// peer must be served by another thread or process).
    pub fn connect(&mut self, local_ip: Ipv4Addr, remote_ip: Ipv4Addr, remote_port: u16) -> Result<MachnetFlow, Error> {
        let token = self.start_connect(local_ip, remote_ip, remote_port)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            self.poll();
            if let Some(r) = self.connect_result(token) {
                return r;
            }
            if std::time::Instant::now() > deadline {
                // Forget it; a late success is closed (take_events).
                self.connects.retain(|c| c.token != token);
                return Err(Error::TimedOut);
            }
        }
    }

    /// Queues `data` as one message on `flow` and sends what the window allows at once.
    /// `Err(NoBuffers)`: not enough free transmit buffers now (poll, then retry); nothing was
    /// consumed.
    pub fn send(&mut self, flow: MachnetFlow, data: &[u8]) -> Result<(), Error> {
        if data.is_empty() || data.len() > MAX_MSG {
            return Err(Error::InvalidLength);
        }
        let Some(id) = self.ep.lookup(&tuple_of(&flow)) else { return Err(Error::Daemon(Status::NoSuchFlow)) };
        let size = self.env.tx.size;
        let count = data.len().div_ceil(size);
        if self.env.tx.free.len() < count {
            return Err(Error::NoBuffers);
        }
        let (mut head, mut prev) = (NIL, NIL);
        let mut polled = false;
        for (i, chunk) in data.chunks(size).enumerate() {
            if i % POLL_EVERY == POLL_EVERY - 1 {
                // A long copy (an 8 MiB message takes about a millisecond) must not keep the
                // stack from acknowledging: the peer's RTO would fire spuriously. The slots
                // taken so far belong to no flow yet, so a poll cannot touch them.
                self.poll();
                polled = true;
            }
            let s = self.env.tx.take().expect("counted above");
            self.env.tx.slot_mut(s)[..chunk.len()].copy_from_slice(chunk);
            self.env.tx.len[s as usize] = chunk.len() as u32;
            self.env.tx.flags[s as usize] = MsgFlags::for_fragment(i, count).bits();
            if prev == NIL {
                head = s;
            } else {
                self.env.tx.next[prev as usize] = s;
            }
            prev = s;
        }
        let msg = OutMsg { head, tail: prev, count: count as u32, len: data.len() as u32 };
        // The flow may have ended during a poll (and its id gone to another flow).
        let id = if polled { self.ep.lookup(&tuple_of(&flow)) } else { Some(id) };
        // (Queueing reads no clock: the frames are stamped when a flush sends them.)
        let sent = match id {
            Some(id) => self.ep.send(&mut self.env, id, &msg),
            None => Err(machnet_transport::Error::NoSuchFlow),
        };
        match sent {
            Ok(()) => {
                // With received messages still waiting, the application will be back at once
                // (answering them): its sends are batched and leave when it next finds
                // nothing to receive, calls `flush`, or `send_batch` are queued. Otherwise
                // they leave now.
                self.unflushed += 1;
                if self.env.inbox.is_empty() || self.unflushed >= self.send_batch {
                    self.flush();
                }
                Ok(())
            }
            Err(e) => {
                let mut s = head;
                for _ in 0..count {
                    let next = self.env.tx.next[s as usize];
                    self.env.tx.put(s);
                    s = next;
                }
                Err(match e {
                    machnet_transport::Error::BadMessage => Error::InvalidLength,
                    _ => Error::Daemon(Status::Closed),
                })
            }
        }
    }

    /// Sends everything queued now.
    pub fn flush(&mut self) {
        self.unflushed = 0;
        let now = self.clock.now();
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
    }

    /// A complete message, if one is ready (polling the stack first if none is): its length
    /// and flow (from the peer to us). `Err(TooSmall)`: `buf` cannot hold it; it was discarded.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, Error> {
        if self.env.inbox.is_empty() {
            self.poll();
        }
        let Some(m) = self.env.inbox.pop_front() else { return Ok(None) };
        let len = m.msg.len as usize;
        let fits = len <= buf.len();
        let mut s = m.msg.head;
        let mut off = 0;
        for i in 0..m.msg.count as usize {
            if i % POLL_EVERY == POLL_EVERY - 1 {
                // As in `send`: keep acknowledging through a long copy. The message is off the
                // inbox and its slots are ours, so a poll cannot touch them.
                self.poll();
            }
            if fits {
                let b = self.env.rx.bytes(s);
                buf[off..off + b.len()].copy_from_slice(b);
                off += b.len();
            }
            let next = self.env.rx.next[s as usize];
            self.env.rx.put(s);
            if next == NIL {
                break;
            }
            s = next;
        }
        if self.env.blocked {
            self.env.blocked = false;
            self.ep.on_writable(APP);
        }
        if fits {
            Ok(Some((len, m.flow)))
        } else {
            Err(Error::TooSmall { needed: len })
        }
    }

    /// Like [`recv`](Self::recv), polling until a message arrives or `timeout` passes.
    pub fn recv_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.recv(buf)? {
                return Ok(Some(m));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Closes `flow` gracefully: what was queued is still delivered, then the peer is told.
    pub fn close(&mut self, flow: MachnetFlow) -> Result<(), Error> {
        let now = self.clock.now();
        let id = self.ep.lookup(&tuple_of(&flow)).ok_or(Error::Daemon(Status::NoSuchFlow))?;
        let _ = self.ep.close(now, &mut self.env, id);
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
        Ok(())
    }
}

impl<P: Port> Drop for Embedded<P> {
    fn drop(&mut self) {
        // Tell peers: every flow is reset.
        let now = self.clock.now();
        self.ep.close_owner(now, &mut self.env, APP);
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
    }
}
