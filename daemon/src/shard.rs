//! One engine shard: a port queue, the flows of its channels, and the stages that move data
//! between them.
//!
//! Stages, in order, every loop:
//!
//! | stage | does |
//! |---|---|
//! | `control` | commands from the controller: adopt or remove a channel, shut down |
//! | `rx` | receive a burst; ARP and ICMP answered here; Machnet packets to the endpoint |
//! | `channels` | each channel's control requests (listen, connect, close) and queued messages |
//! | `timers` | the timing wheel (retransmission, handshakes), ARP retries |
//! | `tx` | owed ACKs and window-permitted data, the transmit burst, channel doorbells |

use crate::arp::{ArpConfig, ArpTable, Learned, Resolve};
use crate::mesh::{Handoff, Mesh};
use crate::nic::{handle_frame, FlowTimers, PortTx, Rx};
use arrayvec::ArrayVec;
use machnet::ctrl::AppId;
use machnet::engine::{CtrlRequest, DeliverError, EngineChannel, TxMsg, Violation};
use machnet::layout::{MachnetFlow, MSG_MAX_LEN};
use machnet::ops::{CtrlOp, Event as ChEvent, EventKind, Status};
use machnet_net::port::{Burst, PacketBuf, Port, BURST};
use machnet_net::time::Instant;
use machnet_net::wire::{ChecksumCaps, EthernetAddress, FrameRepr, MsgFlags};
use machnet_runtime::idle::FdSet;
use machnet_runtime::shard::{Pipeline, Recorder};
use machnet_runtime::stage::Work;
use machnet_transport::{
    ConnectError, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, OutMsg, Owner, RxAdmission, Seg,
};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NIL: u32 = u32::MAX;
/// Messages taken from one channel per round (fairness between channels).
const TX_BUDGET: usize = 64;
/// Control requests taken from one channel per round.
const CTRL_BUDGET: usize = 16;
/// While a delivery waits for an application to read, or frames for the device to take them,
/// parks are cut to this.
const BLOCKED_RECHECK: Duration = Duration::from_micros(100);

/// CPU time of the calling thread, ns (a system call: only for rare operations).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A channel adopted by a shard.
pub struct ChannelSlot {
    /// Daemon-wide channel id.
    pub id: u64,
    /// The application that owns it.
    pub app: AppId,
    /// The application's group on this shard: its channels' flows together may number
    /// `transport.max_flows_per_app`.
    group: u16,
    /// Engine side of the shared memory.
    pub ch: EngineChannel,
    /// Transmit chains as the transport links them (engine-private: the app cannot change
    /// them): next segment, and fragment flags.
    tx_next: Vec<u32>,
    tx_flags: Vec<u8>,
    /// The last delivery found the application's ring full.
    blocked: bool,
    /// The application detached or died: its flows are draining until this deadline.
    linger: Option<Instant>,
    /// When the lingering channel is next checked.
    next_check: Instant,
    /// The first protocol violation seen (the channel is closed after this round).
    violation: Option<Violation>,
    /// Keeps the flows sharing this channel's receive pool from deadlocking in reassembly.
    admission: RxAdmission,
    /// Messages refused as "not permitted" (another application's flow): the first and
    /// every power of ten are logged.
    not_permitted: u64,
}

impl ChannelSlot {
    /// Wraps a newly created channel.
    pub fn new(id: u64, app: AppId, ch: EngineChannel) -> Self {
        let n = ch.layout().cfg.tx_bufs as usize;
        let admission = RxAdmission::new(ch.layout().cfg.rx_bufs as usize, ch.mss(), MSG_MAX_LEN);
        ChannelSlot {
            id,
            app,
            group: 0,
            ch,
            tx_next: vec![NIL; n],
            tx_flags: vec![0; n],
            blocked: false,
            linger: None,
            next_check: Instant::ZERO,
            violation: None,
            admission,
            not_permitted: 0,
        }
    }
}

/// Orders from the controller.
pub enum ShardCmd {
    /// Serve this channel.
    AddChannel(Box<ChannelSlot>),
    /// The channel was detached or its application died: close its flows, reclaim it.
    RemoveChannel {
        /// Channel id.
        id: u64,
        /// The application died (its registration connection closed) rather than detaching:
        /// its flows get the shorter `gone_linger`, so its peers learn of it promptly.
        gone: bool,
    },
    /// Reset every flow, tell the applications, and stop.
    Shutdown,
}

/// Counters of a shard beyond the endpoint's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Frames that did not parse (by any reason), or were not for us.
    pub rx_dropped: u64,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ARP requests sent.
    pub arp_requests: u64,
    /// ARP replies not believed: unsolicited (no request of ours waiting), or naming a
    /// static entry.
    pub arp_ignored: u64,
    /// Re-resolutions started because SYNs to a peer went unanswered.
    pub arp_revalidations: u64,
    /// Re-resolutions that found the peer at a new MAC.
    pub arp_changed: u64,
    /// ICMP echo requests answered.
    pub icmp_replies: u64,
    /// Messages refused because the flow does not exist or belongs to another application.
    pub tx_refused: u64,
    /// Messages refused by the transport (flow not established, bad size).
    pub tx_rejected: u64,
    /// Protocol violations seen on channels (each closes its channel).
    pub channel_violations: u64,
    /// Violations by reason, in `machnet::engine::Violation::ALL` order.
    pub violations_by_reason: [u64; Violation::COUNT],
    /// Channels closed for a protocol violation.
    pub channels_closed_violation: u64,
    /// Channels closed because their shared memory was corrupted.
    pub channels_poisoned: u64,
    /// Frames dropped because the device would not take them.
    pub tx_dropped: u64,
    /// Messages that arrived for an application that had gone (dropped).
    pub rx_orphaned: u64,
    /// Lingering channels whose flows had not drained by the deadline (then reset).
    pub linger_expired: u64,
    /// Timers that did not fit the wheel.
    pub timer_overflow: u64,
    /// Frames and ARP mappings handed to other shards.
    pub handoff_sent: u64,
    /// Handed in by other shards.
    pub handoff_received: u64,
    /// Hand-offs dropped because the other shard's ring was full.
    pub handoff_dropped: u64,
    /// The most CPU time one channel adoption or removal took on the shard thread, ns
    /// (thread CPU time: a preemption in the middle does not count).
    pub max_channel_op_cpu_ns: u64,
}

/// Where a shard publishes its report, and how a controller asks for a fresh one.
#[derive(Debug, Default)]
pub struct Reporting {
    /// The snapshot; the shard only ever `try_lock`s it.
    pub report: Mutex<ShardReport>,
    /// A controller wants a report now (the shard publishes at its next turn, with the lists).
    pub asked: std::sync::atomic::AtomicBool,
}

impl Reporting {
    /// A new, empty one, shared.
    pub fn shared() -> Arc<Reporting> {
        Arc::new(Reporting::default())
    }

    /// The latest report.
    pub fn snapshot(&self) -> ShardReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// One channel as the shard sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelInfo {
    /// The shard's name for it (the owner of its flows).
    pub owner: Owner,
    /// Daemon-wide channel id.
    pub id: u64,
    /// The application.
    pub app: u64,
    /// Detached or its application died; its flows are draining.
    pub lingering: bool,
    /// The last delivery found the application's receive ring full.
    pub blocked: bool,
    /// Buffers, rings and counters.
    pub stats: machnet::engine::EngineStats,
}

/// What a controller asked a shard to list, filled in by the shard (on its own thread, into
/// memory reserved at start-up) at its next report.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// Bumped each time the lists are filled.
    pub seq: u64,
    /// Live flows.
    pub flows: Vec<machnet_transport::FlowInfo>,
    /// Channels.
    pub channels: Vec<ChannelInfo>,
    /// ARP entries: IP, MAC, static.
    pub arp: Vec<(Ipv4Addr, EthernetAddress, bool)>,
    /// The remote IPs holding the most half-open flows (at most [`TOP_HALF_OPEN`]), most first.
    pub half_open_sources: Vec<(Ipv4Addr, u32)>,
}

/// Sources [`Detail::half_open_sources`] lists.
pub const TOP_HALF_OPEN: usize = 16;

/// A snapshot a controller can read without stalling the shard (the shard only ever
/// `try_lock`s it).
#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    /// A controller wants [`Detail`] filled: the shard fills it when `detail.seq` is below.
    pub detail_wanted: u64,
    /// The lists, as of `detail.seq`.
    pub detail: Detail,
    /// Channels served.
    pub channels: usize,
    /// Live flows.
    pub flows: usize,
    /// Of them, half-open (a SYN received, the handshake not finished).
    pub half_open: usize,
    /// Endpoint counters.
    pub endpoint: machnet_transport::EndpointStats,
    /// Shard counters.
    pub counters: ShardCounters,
    /// Fault injection counters, when the port is wrapped by the injector.
    pub faults: Option<machnet_net::port::fault::FaultStats>,
}

/// The transport's environment: channel buffers, the port's transmit side, timers, events.
pub struct ShardEnv<P: Port> {
    nic: PortTx<P>,
    channels: Vec<Option<ChannelSlot>>,
    timers: FlowTimers,
    blocked: bool,
    counters: ShardCounters,
}

impl<P: Port> ShardEnv<P> {
    fn slot(&mut self, owner: Owner) -> Option<&mut ChannelSlot> {
        self.channels.get_mut(owner as usize)?.as_mut()
    }
}

fn to_mflow(t: &FlowTuple) -> MachnetFlow {
    MachnetFlow {
        src_ip: t.local_ip.to_bits(),
        dst_ip: t.remote_ip.to_bits(),
        src_port: t.local_port,
        dst_port: t.remote_port,
    }
}

impl<P: Port> Env for ShardEnv<P> {
    fn alloc_rx(&mut self, owner: Owner, payload: &[u8], _flags: MsgFlags) -> Option<Seg> {
        self.slot(owner)?.ch.alloc_rx(payload)
    }
    #[inline]
    fn admit_rx(&mut self, owner: Owner, flow: FlowId, completes: bool, now: Instant) -> bool {
        let Some(s) = self.slot(owner) else { return true };
        let mut free = s.ch.rx_free_len();
        if free <= s.admission.reserve() {
            free = s.ch.rx_available();
        }
        s.admission.admit(flow, free, completes, now)
    }
    fn rx_released(&mut self, owner: Owner, flow: FlowId) {
        if let Some(s) = self.slot(owner) {
            s.admission.release(flow);
        }
    }
    fn link_rx(&mut self, owner: Owner, prev: Seg, next: Seg) {
        if let Some(s) = self.slot(owner) {
            s.ch.link_rx(prev, next);
        }
    }
    fn free_rx(&mut self, owner: Owner, seg: Seg) {
        if let Some(s) = self.slot(owner) {
            s.ch.free_rx(seg);
        }
    }
    fn free_rx_chain(&mut self, owner: Owner, head: Seg, count: u32) {
        if let Some(s) = self.slot(owner) {
            s.ch.free_rx_chain(head, count);
        }
    }
    fn deliver(&mut self, owner: Owner, _flow: FlowId, tuple: &FlowTuple, msg: &InMsg) -> bool {
        let Some(s) = self.slot(owner) else { return true };
        if s.linger.is_some() {
            // The application is gone: nobody will read this.
            s.ch.free_rx_chain(msg.head, msg.count);
            self.counters.rx_orphaned += 1;
            return true;
        }
        // Received messages read as "from the remote peer to us".
        let flow = MachnetFlow {
            src_ip: tuple.remote_ip.to_bits(),
            dst_ip: tuple.local_ip.to_bits(),
            src_port: tuple.remote_port,
            dst_port: tuple.local_port,
        };
        match s.ch.deliver(flow, msg.head, msg.count, msg.len) {
            Ok(()) => true,
            Err(DeliverError::Full) => {
                s.blocked = true;
                self.blocked = true;
                false
            }
            Err(DeliverError::BadChain) => {
                log::error!("channel {}: engine produced a bad receive chain; message dropped", s.id);
                s.ch.free_rx_chain(msg.head, msg.count);
                true
            }
        }
    }
    fn tx_meta(&self, owner: Owner, seg: Seg) -> (usize, MsgFlags) {
        match self.channels.get(owner as usize).and_then(|s| s.as_ref()) {
            Some(s) => {
                (s.ch.seg_len(seg), MsgFlags::from_bits_retain(s.tx_flags.get(seg as usize).copied().unwrap_or(0)))
            }
            None => (0, MsgFlags::empty()),
        }
    }
    fn tx_next(&self, owner: Owner, seg: Seg) -> Option<Seg> {
        let s = self.channels.get(owner as usize)?.as_ref()?;
        let n = *s.tx_next.get(seg as usize)?;
        (n != NIL).then_some(n)
    }
    fn tx_link(&mut self, owner: Owner, prev: Seg, next: Seg) {
        if let Some(s) = self.slot(owner) {
            if let Some(x) = s.tx_next.get_mut(prev as usize) {
                *x = next;
            }
        }
    }
    fn free_tx(&mut self, owner: Owner, seg: Seg) {
        if let Some(s) = self.slot(owner) {
            s.ch.free_tx(seg);
        }
    }
    fn transmit(&mut self, owner: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        let slot = self.channels.get(owner as usize).and_then(|s| s.as_ref());
        self.nic.send_frame(frame, |out| match (payload, slot) {
            (Some(seg), Some(s)) => s.ch.read_seg(seg, out),
            _ => 0,
        })
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timers.set(flow, at);
    }
    fn event(&mut self, owner: Owner, event: Event) {
        let Some(s) = self.slot(owner) else { return };
        match event {
            Event::Connected { tuple, token, .. } => {
                let _ = s.ch.complete(token, Ok(to_mflow(&tuple)));
            }
            Event::ConnectFailed { token, error } => {
                let st = match error {
                    ConnectError::Refused => Status::Refused,
                    ConnectError::Timeout => Status::TimedOut,
                };
                let _ = s.ch.complete(token, Err(st));
            }
            Event::PeerClosed { tuple, .. } => {
                s.ch.post_event(ChEvent {
                    kind: EventKind::FlowClosed,
                    flow: to_mflow(&tuple),
                    status: Status::Closed,
                    aux: 0,
                });
            }
            Event::FlowFailed { tuple, .. } => {
                s.ch.post_event(ChEvent {
                    kind: EventKind::FlowFailed,
                    flow: to_mflow(&tuple),
                    status: Status::TimedOut,
                    aux: 0,
                });
            }
            Event::Accepted { .. } | Event::Closed { .. } => {}
        }
    }
}

/// A connect waiting for ARP.
#[derive(Debug, Clone, Copy)]
struct PendingConnect {
    owner: Owner,
    id: u64,
    remote_ip: Ipv4Addr,
    remote_port: u16,
}

/// Everything one shard needs at start-up.
pub struct ShardSetup<P: Port> {
    /// Shard index (its queue on the port).
    pub index: usize,
    /// The port queue.
    pub port: P,
    /// Transport endpoint.
    pub endpoint: Endpoint,
    /// ARP behaviour and static entries.
    pub arp: (ArpConfig, Vec<(Ipv4Addr, EthernetAddress)>),
    /// Receive checksum handling (transmit comes from the port's capabilities).
    pub rx_caps: ChecksumCaps,
    /// Commands from the controller.
    pub cmds: Receiver<ShardCmd>,
    /// Where the shard registers channel doorbells.
    pub fds: FdSet,
    /// Where the shard publishes its report.
    pub report: Arc<Reporting>,
    /// How long a detached channel's flows may take to drain.
    pub linger: Duration,
    /// The same for the channels of an application that died.
    pub gone_linger: Duration,
    /// Hand-off rings to and from the other shards.
    pub mesh: Mesh<P::Buf>,
    /// Where closed channels go to be unmapped and freed (by the controller).
    pub graveyard: SyncSender<Box<ChannelSlot>>,
}

/// The pipeline of one shard.
pub struct EngineShard<P: Port> {
    index: usize,
    ep: Endpoint,
    env: ShardEnv<P>,
    arp: ArpTable,
    local: LocalAddr,
    rx_caps: ChecksumCaps,
    cmds: Receiver<ShardCmd>,
    /// A command `before_park` took from `cmds` (it cannot peek); handled first.
    deferred_cmd: Option<ShardCmd>,
    fds: FdSet,
    pending: Vec<PendingConnect>,
    arp_send: Vec<Ipv4Addr>,
    arp_failed: Vec<Ipv4Addr>,
    /// The receive burst, boxed so that taking it out for a loop moves a pointer, not 32
    /// buffers (`None` only while the loop runs).
    rx: Option<Box<Burst<P::Buf>>>,
    last_now: Instant,
    done: bool,
    report: Arc<Reporting>,
    last_report: Instant,
    last_debug: u64,
    linger: Duration,
    gone_linger: Duration,
    mesh: Mesh<P::Buf>,
    graveyard: SyncSender<Box<ChannelSlot>>,
}

/// Channels one shard serves at most.
pub const MAX_CHANNELS_PER_SHARD: usize = 1024;

impl<P: Port> EngineShard<P> {
    /// Builds a shard (its memory is reserved here).
    pub fn new(s: ShardSetup<P>) -> Self {
        let max_flows = s.endpoint.config().max_flows;
        let local = s.endpoint.local();
        let arp_capacity = s.arp.0.capacity;
        let mut arp = ArpTable::new(s.arp.0);
        for (ip, mac) in s.arp.1 {
            arp.add_static(ip, mac);
        }
        if let Ok(mut r) = s.report.report.lock() {
            let d = &mut r.detail;
            d.flows.reserve(max_flows);
            d.channels.reserve(MAX_CHANNELS_PER_SHARD);
            d.arp.reserve(arp_capacity);
            d.half_open_sources.reserve(TOP_HALF_OPEN);
        }
        EngineShard {
            index: s.index,
            env: ShardEnv {
                nic: PortTx::new(s.port),
                channels: Vec::with_capacity(MAX_CHANNELS_PER_SHARD),
                // Anchored at the current time (the shard's clock is CLOCK_MONOTONIC-based).
                timers: FlowTimers::new(max_flows, Instant(machnet_runtime::clock::monotonic_ns())),
                blocked: false,
                counters: ShardCounters::default(),
            },
            ep: s.endpoint,
            arp,
            local,
            rx_caps: s.rx_caps,
            cmds: s.cmds,
            deferred_cmd: None,
            fds: s.fds,
            // At most one pending connect per flow the shard can hold: never grows.
            pending: Vec::with_capacity(max_flows),
            arp_send: Vec::with_capacity(arp_capacity),
            arp_failed: Vec::with_capacity(arp_capacity),
            rx: Some(Box::new(Burst::new())),
            last_now: Instant::ZERO,
            done: false,
            report: s.report,
            last_report: Instant::ZERO,
            last_debug: 0,
            linger: s.linger,
            gone_linger: s.gone_linger,
            mesh: s.mesh,
            graveyard: s.graveyard,
        }
    }

    // --- control -------------------------------------------------------------------------

    fn poll_cmds(&mut self, now: Instant) -> Work {
        let mut n = 0;
        loop {
            let cmd = match self.deferred_cmd.take() {
                Some(c) => Ok(c),
                None => self.cmds.try_recv(),
            };
            match cmd {
                Ok(ShardCmd::AddChannel(slot)) => {
                    n += 1;
                    self.adopt(*slot);
                }
                Ok(ShardCmd::RemoveChannel { id, gone }) => {
                    n += 1;
                    if let Some(owner) = self.owner_of_channel(id) {
                        let linger = if gone { self.gone_linger.min(self.linger) } else { self.linger };
                        self.start_linger(now, owner, linger);
                    }
                }
                Ok(ShardCmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.shutdown(now);
                    return Work(n + 1);
                }
                Err(TryRecvError::Empty) => return Work(n),
            }
        }
    }

    fn adopt(&mut self, slot: ChannelSlot) {
        let cpu0 = thread_cpu_ns();
        self.adopt_inner(slot);
        self.note_channel_op(cpu0);
    }

    /// Records the CPU time of a channel operation that began at `cpu0`.
    fn note_channel_op(&mut self, cpu0: u64) {
        let c = &mut self.env.counters.max_channel_op_cpu_ns;
        *c = (*c).max(thread_cpu_ns().saturating_sub(cpu0));
    }

    fn adopt_inner(&mut self, mut slot: ChannelSlot) {
        let bell = slot.ch.engine_bell().as_raw_fd();
        let owner = match self.env.channels.iter().position(|s| s.is_none()) {
            Some(i) => i,
            None if self.env.channels.len() < MAX_CHANNELS_PER_SHARD => {
                self.env.channels.push(None);
                self.env.channels.len() - 1
            }
            None => {
                log::error!("shard {}: channel table full; channel {} dropped", self.index, slot.id);
                return;
            }
        };
        if let Err(e) = self.fds.add(bell, owner as u64) {
            log::warn!("shard {}: cannot watch doorbell of channel {}: {e}", self.index, slot.id);
        }
        // The application's group: that of its other channels here, else the lowest unused
        // (group 0 is the transport's default and stays unused).
        let live = || self.env.channels.iter().flatten();
        slot.group = live().find(|s| s.app == slot.app).map(|s| s.group).unwrap_or_else(|| {
            (1..=u16::MAX).find(|&g| !live().any(|s| s.group == g)).expect("fewer channels than groups")
        });
        self.ep.set_owner_group(owner as Owner, slot.group);
        log::info!("shard {}: serving channel {} of app {}", self.index, slot.id, slot.app.0);
        self.env.channels[owner] = Some(slot);
    }

    fn owner_of_channel(&self, id: u64) -> Option<Owner> {
        self.env.channels.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id)).map(|i| i as Owner)
    }

    /// The application detached the channel or died: its listeners close now; its flows close
    /// gracefully, so what it queued still reaches the peers; the channel is reclaimed when the
    /// last flow is gone or the linger time is up.
    fn start_linger(&mut self, now: Instant, owner: Owner, linger: Duration) {
        let Some(slot) = self.env.slot(owner) else { return };
        if slot.linger.is_some() {
            return;
        }
        if slot.ch.is_poisoned() {
            self.remove_owner(now, owner, "closed (corrupted)");
            return;
        }
        // Messages the application queued before it left go out first (the detach request
        // travels on the control socket and can overtake them). At most a ring's worth: an
        // application that keeps writing after its detach must not hold the shard here.
        let mut budget = slot.ch.layout().cfg.tx_ring as usize;
        while budget > 0 {
            let msgs = self.take_messages(owner);
            if msgs.is_empty() {
                break;
            }
            budget = budget.saturating_sub(msgs.len());
            for (m, tail) in msgs {
                self.on_message(now, owner, &m, tail);
            }
        }
        let Some(slot) = self.env.slot(owner) else { return };
        slot.linger = Some(now + linger);
        slot.next_check = now;
        slot.blocked = false;
        // Its flows no longer wait for room in a ring nobody reads.
        self.ep.on_writable(owner);
        self.pending.retain(|p| p.owner != owner);
        let n = self.ep.close_owner_gracefully(now, &mut self.env, owner);
        self.ep.flush(now, &mut self.env);
        log::debug!("shard {}: owner {owner}: {n} flows draining", self.index);
        self.check_linger(now, owner);
    }

    /// Finishes a lingering channel whose flows are gone or whose time is up.
    fn check_linger(&mut self, now: Instant, owner: Owner) {
        let Some(slot) = self.env.slot(owner) else { return };
        let Some(deadline) = slot.linger else { return };
        if now < slot.next_check {
            return;
        }
        slot.next_check = now + Duration::from_millis(1);
        if self.ep.flows_of(owner) == 0 {
            self.remove_owner(now, owner, "closed");
        } else if now >= deadline {
            self.env.counters.linger_expired += 1;
            self.remove_owner(now, owner, "closed (linger expired, flows reset)");
        }
    }

    /// Closes an owner's flows (RST to peers), reclaims its buffers, forgets the channel.
    fn remove_owner(&mut self, now: Instant, owner: Owner, why: &str) {
        let cpu0 = thread_cpu_ns();
        self.remove_owner_inner(now, owner, why);
        self.note_channel_op(cpu0);
    }

    fn remove_owner_inner(&mut self, now: Instant, owner: Owner, why: &str) {
        let flows = self.ep.close_owner(now, &mut self.env, owner);
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
        self.pending.retain(|p| p.owner != owner);
        if let Some(mut slot) = self.env.channels[owner as usize].take() {
            let _ = self.fds.remove(slot.ch.engine_bell().as_raw_fd());
            let r = slot.ch.reclaim_all();
            let st = slot.ch.stats();
            log::info!(
                "shard {}: channel {} of app {} {why}: {flows} flows reset, buffers reclaimed ({r:?}); tx {} rx {} free",
                self.index,
                slot.id,
                slot.app.0,
                st.tx_reclaimed,
                st.rx_free
            );
            // Unmapping a channel's tens of megabytes takes 10-20 ms (measured): the controller
            // does it, off this thread. The application learns at once that the channel is
            // closed.
            slot.ch.mark_dead();
            if let Err(std::sync::mpsc::TrySendError::Full(slot) | std::sync::mpsc::TrySendError::Disconnected(slot)) =
                self.graveyard.try_send(Box::new(slot))
            {
                drop(slot);
            }
        }
    }

    fn shutdown(&mut self, now: Instant) {
        for owner in 0..self.env.channels.len() as Owner {
            if self.env.channels[owner as usize].is_none() {
                continue;
            }
            self.ep.close_owner(now, &mut self.env, owner);
            if let Some(s) = self.env.slot(owner) {
                s.ch.post_event(ChEvent {
                    kind: EventKind::FlowClosed,
                    flow: MachnetFlow::default(),
                    status: Status::Closed,
                    aux: 0,
                });
                s.ch.flush();
            }
        }
        self.ep.flush(now, &mut self.env);
        self.env.nic.flush();
        self.done = true;
    }

    // --- receive -------------------------------------------------------------------------

    fn poll_rx(&mut self, now: Instant) -> Work {
        self.env.nic.port.set_time(now);
        let mut rx = self.rx.take().expect("the receive burst is put back after every loop");
        let mut n = self.env.nic.port.rx_burst(&mut rx);
        for b in rx.drain(..) {
            // The kernel's receive time, where the port knows it, keeps the time this frame
            // waited for the shard out of round-trip samples.
            let rx_at = b.rx_timestamp().unwrap_or(now);
            self.on_frame(now, b, rx_at, false);
        }
        self.rx = Some(rx);
        if self.mesh.shards() > 1 {
            let mut frames: ArrayVec<(P::Buf, Instant), BURST> = ArrayVec::new();
            let mut arps: ArrayVec<(Ipv4Addr, EthernetAddress), BURST> = ArrayVec::new();
            n += self.mesh.receive(BURST, |h| match h {
                Handoff::Frame { buf, rx_at } => frames.push((buf, rx_at)),
                Handoff::Arp { ip, mac } => arps.push((ip, mac)),
            });
            for (buf, rx_at) in frames {
                self.on_frame(now, buf, rx_at, true);
            }
            for (ip, mac) in arps {
                // Another shard's reply: it counts here only if this shard asked too.
                let learned = self.arp.on_reply(ip, mac, now);
                if learned != Learned::Ignored {
                    self.on_learned(now, ip, mac, learned);
                }
            }
        }
        if n > 0 {
            self.ep.flush(now, &mut self.env);
        }
        self.mesh.wake();
        Work(n as u32)
    }

    /// One received frame: `handed` frames come from another shard, which verified them and
    /// found this shard the owner of their destination port.
    fn on_frame(&mut self, now: Instant, b: P::Buf, rx_at: Instant, handed: bool) {
        let caps = if handed || b.rx_checksum_good() { self.rx_caps.without_rx() } else { self.rx_caps };
        let mut forward_to = None;
        match handle_frame(&mut self.env.nic, &mut self.arp, self.local, b.frame(), caps, now) {
            Rx::Machnet(m) => match self.ep.ports().owner(m.dst_port) {
                Some(o) if !handed && usize::from(o) != self.index && self.mesh.shards() > 1 => {
                    forward_to = Some(usize::from(o));
                }
                _ => self.ep.handle_at(now, rx_at, &mut self.env, &m),
            },
            Rx::Arp { ip, mac, learned, replied } => {
                self.env.counters.arp_replies += u64::from(replied);
                if let Some(learned) = learned {
                    if self.mesh.shards() > 1 {
                        // A resolution waiting for this reply may be another shard's.
                        self.mesh.broadcast_arp(ip, mac);
                    }
                    self.on_learned(now, ip, mac, learned);
                }
            }
            Rx::Icmp(replied) => self.env.counters.icmp_replies += u64::from(replied),
            Rx::Dropped => self.env.counters.rx_dropped += 1,
        }
        match forward_to {
            Some(to) => {
                if let Err(Handoff::Frame { buf, .. }) = self.mesh.send(to, Handoff::Frame { buf: b, rx_at }) {
                    self.env.nic.port.free(buf);
                }
            }
            None => self.env.nic.port.free(b),
        }
    }

    /// An ARP reply did `learned` to the table.
    fn on_learned(&mut self, now: Instant, ip: Ipv4Addr, mac: EthernetAddress, learned: Learned) {
        match learned {
            Learned::Ignored => self.env.counters.arp_ignored += 1,
            Learned::Resolved => self.run_pending(now, ip, Some(mac)),
            Learned::Changed => {
                self.env.counters.arp_changed += 1;
                let n = self.ep.update_peer_mac(now, &mut self.env, ip, mac);
                log::info!("shard {}: {ip} moved to {mac}; {n} connects in progress follow it", self.index);
                self.run_pending(now, ip, Some(mac));
            }
        }
    }

    fn send_arp_request(&mut self, ip: Ipv4Addr) {
        if self.env.nic.send_arp_request(self.local, ip) {
            self.env.counters.arp_requests += 1;
        }
    }

    /// Connects (or fails, with `mac == None`) every connect waiting for `ip`.
    fn run_pending(&mut self, now: Instant, ip: Ipv4Addr, mac: Option<EthernetAddress>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].remote_ip != ip {
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            match mac {
                Some(mac) => self.connect_now(now, p, mac),
                None => self.complete(p.owner, p.id, Err(Status::Unreachable)),
            }
        }
    }

    /// Whether `owner`'s application has fewer connects waiting for ARP than it may hold flows
    /// (a scan of the pending list: a control path).
    fn may_wait_for_arp(&self, owner: Owner) -> bool {
        let group = |o: Owner| self.env.channels.get(o as usize).and_then(|s| s.as_ref()).map(|s| s.group);
        let g = group(owner);
        self.pending.iter().filter(|p| group(p.owner) == g).count() < self.ep.config().max_flows_per_group
    }

    fn connect_now(&mut self, now: Instant, p: PendingConnect, mac: EthernetAddress) {
        match self.ep.connect(now, &mut self.env, p.owner, p.remote_ip, mac, p.remote_port, p.id) {
            Ok(_) => {}
            Err(e) => {
                let st = match e {
                    machnet_transport::Error::NoPortAvailable | machnet_transport::Error::TooManyFlows => {
                        Status::NoResources
                    }
                    _ => Status::Internal,
                };
                self.complete(p.owner, p.id, Err(st));
            }
        }
    }

    fn complete(&mut self, owner: Owner, id: u64, result: Result<MachnetFlow, Status>) {
        if let Some(s) = self.env.slot(owner) {
            let _ = s.ch.complete(id, result);
        }
    }

    // --- channels ------------------------------------------------------------------------

    fn poll_channels(&mut self, now: Instant) -> Work {
        let mut work = 0u32;
        for owner in 0..self.env.channels.len() as Owner {
            let Some(slot) = self.env.channels[owner as usize].as_mut() else { continue };
            if slot.linger.is_some() {
                self.check_linger(now, owner);
                continue;
            }
            if slot.ch.is_poisoned() {
                self.env.counters.channels_poisoned += 1;
                log::warn!(
                    "shard {}: channel {} of app {} corrupted its shared memory; closing it",
                    self.index,
                    slot.id,
                    slot.app.0
                );
                self.remove_owner(now, owner, "closed (corrupted)");
                continue;
            }
            // Retry a blocked delivery only once the application made room: retrying into a
            // full ring would count as work every round and the shard would never park.
            if slot.blocked && slot.ch.can_deliver() {
                slot.blocked = false;
                self.ep.on_writable(owner);
                work += 1;
            }
            // Control requests first (a connect should not wait behind bulk data).
            let mut reqs: ArrayVec<CtrlRequest, CTRL_BUDGET> = ArrayVec::new();
            while !reqs.is_full() {
                match slot.ch.poll_ctrl() {
                    Some(Ok(r)) => reqs.push(r),
                    Some(Err(v)) => {
                        slot.violation.get_or_insert(v);
                        break;
                    }
                    None => break,
                }
            }
            // Then messages.
            let msgs = self.take_messages(owner);
            work += (reqs.len() + msgs.len()) as u32;
            for r in reqs {
                self.on_ctrl(now, owner, r);
            }
            for (m, tail) in msgs {
                self.on_message(now, owner, &m, tail);
            }
            if let Some(v) = self.env.slot(owner).and_then(|s| s.violation.or_else(|| s.ch.first_violation())) {
                // The client library never does this: the application wrote its shared memory
                // by other means. Its channel is closed; nothing else is affected.
                let c = &mut self.env.counters;
                c.channel_violations += 1;
                c.violations_by_reason[v as usize] += 1;
                c.channels_closed_violation += 1;
                let why = format!("closed: protocol violation ({v:?})");
                if let Some(s) = self.env.slot(owner) {
                    log::warn!("shard {}: channel {} of app {}: {v:?}; closing it", self.index, s.id, s.app.0);
                }
                self.remove_owner(now, owner, &why);
                work += 1;
            }
        }
        if work > 0 {
            self.ep.flush(now, &mut self.env);
        }
        Work(work)
    }

    /// Takes up to a budget of queued messages from a channel, copying each chain's links and
    /// fragment flags out of shared memory. Returns each message with its last segment.
    fn take_messages(&mut self, owner: Owner) -> ArrayVec<(TxMsg, u32), TX_BUDGET> {
        let mut msgs = ArrayVec::new();
        let Some(slot) = self.env.channels[owner as usize].as_mut() else { return msgs };
        while !msgs.is_full() {
            match slot.ch.poll_tx() {
                Some(Ok(m)) => {
                    let mut s = m.head;
                    let mut tail = m.head;
                    let count = m.count as usize;
                    for i in 0..count {
                        let mut f = MsgFlags::for_fragment(i, count);
                        if i == 0 && m.flags & u32::from(MsgFlags::NOTIFY_DELIVERY.bits()) != 0 {
                            f |= MsgFlags::NOTIFY_DELIVERY;
                        }
                        slot.tx_flags[s as usize] = f.bits();
                        let next = if i + 1 < count { slot.ch.seg_next(s) } else { None };
                        slot.tx_next[s as usize] = next.unwrap_or(NIL);
                        tail = s;
                        match next {
                            Some(n) => s = n,
                            None => break,
                        }
                    }
                    msgs.push((m, tail));
                }
                Some(Err(v)) => {
                    slot.violation.get_or_insert(v);
                    break;
                }
                None => break,
            }
        }
        msgs
    }

    fn on_ctrl(&mut self, now: Instant, owner: Owner, r: CtrlRequest) {
        let result = match r.op {
            CtrlOp::Listen { ip, port } => {
                if ip != self.local.ip && !ip.is_unspecified() {
                    Err(Status::AddrNotLocal)
                } else {
                    match self.ep.listen(owner, port) {
                        Ok(()) => {
                            Ok(MachnetFlow { src_ip: self.local.ip.to_bits(), src_port: port, ..Default::default() })
                        }
                        Err(machnet_transport::Error::PortInUse) => Err(Status::AddrInUse),
                        Err(_) => Err(Status::NoResources),
                    }
                }
            }
            CtrlOp::Connect { local_ip, remote_ip, remote_port } => {
                if local_ip != self.local.ip {
                    Err(Status::AddrNotLocal)
                } else if remote_ip.is_unspecified()
                    || remote_ip.is_broadcast()
                    || remote_ip.is_multicast()
                    || remote_port == 0
                {
                    Err(Status::BadRequest)
                } else {
                    let p = PendingConnect { owner, id: r.id, remote_ip, remote_port };
                    match self.arp.resolve(remote_ip, now) {
                        Resolve::Known(mac) => self.connect_now(now, p, mac),
                        // As many connects wait for ARP as the shard has flows, and one
                        // application's as many as it may have flows.
                        Resolve::SendRequest | Resolve::InProgress
                            if self.pending.len() == self.pending.capacity() || !self.may_wait_for_arp(owner) =>
                        {
                            self.complete(owner, r.id, Err(Status::NoResources))
                        }
                        Resolve::SendRequest => {
                            self.pending.push(p);
                            self.send_arp_request(remote_ip);
                        }
                        Resolve::InProgress => self.pending.push(p),
                        Resolve::Full => self.complete(owner, r.id, Err(Status::NoResources)),
                    }
                    // Answered when the handshake ends (or ARP fails).
                    return;
                }
            }
            CtrlOp::Close { flow } => {
                let tuple = FlowTuple {
                    local_ip: Ipv4Addr::from_bits(flow.src_ip),
                    local_port: flow.src_port,
                    remote_ip: Ipv4Addr::from_bits(flow.dst_ip),
                    remote_port: flow.dst_port,
                };
                match self.ep.lookup(&tuple) {
                    Some(id) if self.ep.owner_of(id) == Some(owner) => {
                        let _ = self.ep.close(now, &mut self.env, id);
                        Ok(flow)
                    }
                    Some(_) => Err(Status::NotPermitted),
                    None => {
                        // Closing a listener: the flow names only the local side.
                        if flow.dst_ip == 0 && self.ep.listener(flow.src_port) == Some(owner) {
                            let _ = self.ep.unlisten(owner, flow.src_port);
                            Ok(flow)
                        } else if self.ep.ports().owner(flow.src_port).is_some_and(|s| usize::from(s) != self.index) {
                            // Another shard's port: another application's flow or listener.
                            Err(Status::NotPermitted)
                        } else {
                            Err(Status::NoSuchFlow)
                        }
                    }
                }
            }
        };
        self.complete(owner, r.id, result);
    }

    fn on_message(&mut self, now: Instant, owner: Owner, m: &TxMsg, tail: u32) {
        let tuple = FlowTuple {
            local_ip: Ipv4Addr::from_bits(m.flow.src_ip),
            local_port: m.flow.src_port,
            remote_ip: Ipv4Addr::from_bits(m.flow.dst_ip),
            remote_port: m.flow.dst_port,
        };
        // Isolation: only flows this channel created or accepted. Another application's flow
        // is "not permitted" whether it lives on this shard or on another (whose port it is:
        // a channel's flows are all on its own shard); a flow nobody has is "no such flow".
        let flow = match self.ep.lookup(&tuple) {
            Some(f) if self.ep.owner_of(f) == Some(owner) => f,
            other => {
                self.env.counters.tx_refused += 1;
                let elsewhere = self.ep.ports().owner(tuple.local_port).is_some_and(|s| usize::from(s) != self.index);
                let st = if other.is_some() || elsewhere { Status::NotPermitted } else { Status::NoSuchFlow };
                if let Some(s) = self.env.slot(owner) {
                    s.ch.refuse_tx(m, st);
                    if st == Status::NotPermitted {
                        // Logged, but an application cannot flood the log: the first refusal
                        // and then every power of ten (1, 10, 100, ...) per channel.
                        s.not_permitted += 1;
                        let n = s.not_permitted;
                        if n == 10u64.pow(n.ilog10()) {
                            log::warn!(
                                "shard {}: channel {} of app {}: send on {}:{} -> {}:{} refused, not its flow \
                                 (not permitted; {n} so far on this channel)",
                                self.index,
                                s.id,
                                s.app.0,
                                tuple.local_ip,
                                tuple.local_port,
                                tuple.remote_ip,
                                tuple.remote_port
                            );
                        }
                    }
                }
                return;
            }
        };
        let msg = OutMsg { head: m.head, tail, count: m.count, len: m.len };
        if let Err(e) = self.ep.send(now, &mut self.env, flow, &msg) {
            self.env.counters.tx_rejected += 1;
            let st = match e {
                machnet_transport::Error::BadMessage => Status::BadRequest,
                _ => Status::Closed,
            };
            if let Some(s) = self.env.slot(owner) {
                s.ch.refuse_tx(m, st);
            }
        }
    }

    // --- timers and transmit ---------------------------------------------------------------

    fn poll_timers(&mut self, now: Instant) -> Work {
        let fired = self.env.timers.expire(now);
        let mut n = fired.len() as u32;
        for &f in &fired {
            self.ep.on_timer(now, &mut self.env, f);
        }
        self.env.timers.done(fired);
        let unanswered: ArrayVec<Ipv4Addr, 64> = self.ep.take_unanswered().collect();
        for ip in unanswered {
            if self.arp.revalidate(ip, now) {
                self.env.counters.arp_revalidations += 1;
                self.send_arp_request(ip);
            }
        }
        if self.arp.next_deadline().is_some_and(|d| d <= now) {
            n += 1;
            // Both lists have room for every resolution the table can hold.
            let (mut send, mut failed) = (core::mem::take(&mut self.arp_send), core::mem::take(&mut self.arp_failed));
            self.arp.poll(now, |ip| send.push(ip), |ip| failed.push(ip));
            for ip in send.drain(..) {
                self.send_arp_request(ip);
            }
            for ip in failed.drain(..) {
                self.run_pending(now, ip, None);
            }
            (self.arp_send, self.arp_failed) = (send, failed);
        }
        if n > 0 {
            self.ep.flush(now, &mut self.env);
        }
        Work(n)
    }

    fn poll_tx(&mut self, now: Instant) -> Work {
        if self.ep.has_work() {
            self.ep.flush(now, &mut self.env);
        }
        let queued = self.env.nic.txq.len();
        let sent = self.env.nic.flush();
        for s in self.env.channels.iter_mut().flatten() {
            s.ch.flush();
        }
        if now.as_nanos().saturating_sub(self.last_report.as_nanos()) > 10_000_000
            || self.report.asked.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.last_report = now;
            self.publish();
        }
        Work(if queued > 0 { sent as u32 } else { 0 })
    }

    fn publish(&mut self) {
        self.env.counters.handoff_sent = self.mesh.sent;
        self.env.counters.handoff_received = self.mesh.received;
        self.env.counters.handoff_dropped = self.mesh.dropped;
        self.env.counters.tx_dropped = self.env.nic.dropped;
        self.env.counters.timer_overflow = self.env.timers.overflow;
        if log::log_enabled!(log::Level::Debug) && self.last_report.as_nanos() / 1_000_000_000 != self.last_debug {
            self.last_debug = self.last_report.as_nanos() / 1_000_000_000;
            log::debug!(
                "shard {}: {} channels, {} flows, endpoint {:?}, shard {:?}",
                self.index,
                self.env.channels.iter().flatten().count(),
                self.ep.flow_count(),
                self.ep.stats(),
                self.env.counters
            );
            for f in self.ep.flows() {
                log::debug!("shard {}: flow {:?}", self.index, f);
            }
        }
        if let Ok(mut r) = self.report.report.try_lock() {
            r.channels = self.env.channels.iter().flatten().count();
            r.flows = self.ep.flow_count();
            r.half_open = self.ep.half_open_count();
            r.endpoint = *self.ep.stats();
            r.counters = self.env.counters;
            r.faults = self.env.nic.port.fault_stats();
            if r.detail_wanted > r.detail.seq {
                let now = self.last_now;
                let wanted = r.detail_wanted;
                let d = &mut r.detail;
                // The lists have room for everything a shard can hold (reserved at start): no
                // allocation here.
                d.flows.clear();
                d.flows.extend(self.ep.flows().take(d.flows.capacity()));
                d.channels.clear();
                for (owner, slot) in self.env.channels.iter_mut().enumerate() {
                    if let Some(slot) = slot {
                        d.channels.push(ChannelInfo {
                            owner: owner as Owner,
                            id: slot.id,
                            app: slot.app.0,
                            lingering: slot.linger.is_some(),
                            blocked: slot.blocked,
                            stats: slot.ch.stats(),
                        });
                    }
                }
                d.arp.clear();
                let room = d.arp.capacity();
                d.arp.extend(self.arp.entries(now).take(room));
                let top = &mut d.half_open_sources;
                top.clear();
                for (ip, n) in self.ep.half_open_sources() {
                    if top.len() < TOP_HALF_OPEN {
                        top.push((ip, n));
                    } else if let Some(min) = top.iter_mut().min_by_key(|e| e.1).filter(|m| m.1 < n) {
                        *min = (ip, n);
                    }
                }
                top.sort_unstable_by_key(|e| core::cmp::Reverse(e.1));
                d.seq = wanted;
                self.report.asked.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl<P: Port + Send + 'static> Pipeline for EngineShard<P>
where
    P::Buf: Send,
{
    const STAGES: &'static [&'static str] = &["control", "rx", "channels", "timers", "tx"];

    fn poll(&mut self, now: Instant, rec: &mut Recorder) -> Work {
        self.last_now = now;
        let mut w = rec.run(0, now, || self.poll_cmds(now));
        if self.done {
            // Shut down: no new flows, no more traffic.
            return w;
        }
        w += rec.run(1, now, || self.poll_rx(now));
        w += rec.run(2, now, || self.poll_channels(now));
        w += rec.run(3, now, || self.poll_timers(now));
        w += rec.run(4, now, || self.poll_tx(now));
        w
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.env.timers.next_deadline();
        if let Some(a) = self.arp.next_deadline() {
            d = Some(d.map_or(a, |x| x.min(a)));
        }
        if self.env.blocked || self.ep.has_blocked() || !self.env.nic.txq.is_empty() {
            let b = self.last_now + BLOCKED_RECHECK;
            d = Some(d.map_or(b, |x| x.min(b)));
        }
        if let Some(p) = self.env.nic.port.next_event() {
            d = Some(d.map_or(p, |x| x.min(p)));
        }
        // Lingering channels are checked for their last flow (and their deadline) every 1 ms.
        for s in self.env.channels.iter().flatten() {
            if s.linger.is_some() {
                d = Some(d.map_or(s.next_check, |x| x.min(s.next_check)));
            }
        }
        d
    }

    fn before_park(&mut self) -> bool {
        // Frames the device would not take (`txq`) do not keep the shard awake: it parks at
        // most BLOCKED_RECHECK (next_deadline) and offers them again.
        if self.ep.has_work() || self.mesh.has_input() {
            return false;
        }
        // A command or statistics request that arrived after this round's poll but before
        // the sleeping mark (the controller rings only a shard marked sleeping).
        if self.deferred_cmd.is_some() || self.report.asked.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        match self.cmds.try_recv() {
            Ok(cmd) => {
                self.deferred_cmd = Some(cmd);
                return false;
            }
            Err(TryRecvError::Disconnected) => return false,
            Err(TryRecvError::Empty) => {}
        }
        for s in self.env.channels.iter_mut().flatten() {
            s.ch.announce_sleep();
        }
        let barrier = machnet::engine::sleep_barrier();
        // What a departed (lingering) application still writes is not work.
        self.env.channels.iter_mut().flatten().all(|s| s.linger.is_some() || s.ch.is_idle(barrier))
    }

    fn after_park(&mut self) {
        for s in self.env.channels.iter_mut().flatten() {
            s.ch.finish_sleep();
        }
        self.env.blocked = false;
    }

    fn done(&self) -> bool {
        self.done
    }

    fn shutdown(&mut self, _now: Instant) {
        self.publish();
    }
}
