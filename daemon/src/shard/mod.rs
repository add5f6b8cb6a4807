//! One engine shard: a port queue, the flows of its channels, and the stages that move data
//! between them.
//!
//! Stages, in order, every loop, each a type of its own over the shared [`context`]
//! (`ShardCtx`: the endpoint, the channels, the ARP table, the hand-off mesh):
//!
//! | stage | file | does |
//! |---|---|---|
//! | `control` | `control.rs` | commands from the controller: adopt or remove a channel, shut down |
//! | `rx` | `rx.rs` | receive a burst; ARP and ICMP answered here; Machnet packets to the endpoint or handed to their shard |
//! | `channels` | `channels.rs` | each channel's control requests (listen, connect, close) and queued messages |
//! | `timers` | `timers.rs` | the timing wheel (retransmission, handshakes), ARP retries |
//! | `tx` | `tx.rs` | owed ACKs and window-permitted data, the transmit burst, channel doorbells, the report |
//!
//! Each stage implements [`Stage`] over `ShardCtx` and is called through its concrete type
//! ([`EngineShard`] wires them statically: no `dyn`, nothing allocated in the loop). The
//! transport's environment ([`ShardEnv`]) is in `env.rs`.

mod channels;
mod context;
mod control;
mod env;
mod rx;
mod timers;
mod tx;

use crate::arp::{ArpConfig, ArpTable};
use crate::mesh::Mesh;
use crate::nic::{FlowTimers, PortTx};
use crate::ports::ShardEndpoint;
use channels::ChannelsStage;
use context::ShardCtx;
use control::ControlStage;
pub use env::ShardEnv;
use machnet::ctrl::AppId;
use machnet::engine::{EngineChannel, Violation};
use machnet::layout::MSG_MAX_LEN;
use machnet_net::port::{Burst, Port};
use machnet_net::time::Instant;
use machnet_net::wire::{ChecksumCaps, EthernetAddress};
use machnet_runtime::clock::Clock;
use machnet_runtime::idle::FdSet;
use machnet_runtime::shard::{Pipeline, Recorder};
use machnet_runtime::stage::{Stage, Work};
use machnet_transport::{Owner, RxAdmission};
use rx::RxStage;
use std::net::Ipv4Addr;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use timers::TimersStage;
use tx::TxStage;

const NIL: u32 = u32::MAX;
/// Messages taken from one channel per round (fairness between channels).
const TX_BUDGET: usize = 64;
/// Control requests taken from one channel per round.
const CTRL_BUDGET: usize = 16;
/// While a delivery waits for an application to read, or frames for the device to take them,
/// parks are cut to this.
const BLOCKED_RECHECK: Duration = Duration::from_micros(100);

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
    /// While draining: how long the flows may go without progress, the latest the
    /// deadline may move to, and the progress seen at the last check (live flows, the
    /// sum of their acknowledged sequence numbers).
    linger_idle: Duration,
    linger_end: Instant,
    linger_mark: (usize, u64),
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
            linger_idle: Duration::ZERO,
            linger_end: Instant::ZERO,
            linger_mark: (0, 0),
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
    /// Start (`Some`) or stop (`None`) capturing this shard's frames.
    Capture(Option<Box<crate::capture::Tap>>),
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
    /// ARP replies not believed: unsolicited (no request of ours waiting), naming a static
    /// entry, or from a suspect during a resolution (kept aside).
    pub arp_ignored: u64,
    /// Unsolicited claims that made a MAC suspect for an address (see crate::arp).
    pub arp_suspected: u64,
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
    /// Of `handoff_sent`, received frames handed to the shard that owns their port (the rest
    /// are ARP mappings).
    pub handoff_frames_sent: u64,
    /// Of `handoff_received`, frames.
    pub handoff_frames_received: u64,
    /// Frames this shard's port queue received (as the port counts them).
    pub port_rx_frames: u64,
    /// Frames its port queue transmitted.
    pub port_tx_frames: u64,
    /// Frames its port queue dropped on receipt (too short or long, from an unknown sender:
    /// on the udp backend, also a peer configured with fewer queues than it has).
    pub port_rx_dropped: u64,
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

/// Everything one shard needs at start-up.
pub struct ShardSetup<P: Port> {
    /// Shard index (its queue on the port).
    pub index: usize,
    /// The port queue.
    pub port: P,
    /// Transport endpoint.
    pub endpoint: ShardEndpoint,
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
    /// How long a detached channel's flows may go without progress while they drain.
    pub linger: Duration,
    /// The most a detached channel's flows may take to drain, progressing or not.
    pub linger_max: Duration,
    /// How long the flows of an application that died may take to drain (in all).
    pub gone_linger: Duration,
    /// Hand-off rings to and from the other shards.
    pub mesh: Mesh<P::Buf>,
    /// Where closed channels go to be unmapped and freed (by the controller).
    pub graveyard: SyncSender<Box<ChannelSlot>>,
}

/// The pipeline of one shard: its stages, in the order they run, over the context they share.
pub struct EngineShard<P: Port> {
    ctx: ShardCtx<P>,
    control: ControlStage,
    rx: RxStage<P>,
    channels: ChannelsStage,
    timers: TimersStage,
    tx: TxStage,
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
        let ctx = ShardCtx {
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
            fds: s.fds,
            // At most one pending connect per flow the shard can hold: never grows.
            pending: Vec::with_capacity(max_flows),
            mesh: s.mesh,
            graveyard: s.graveyard,
            last_now: Instant::ZERO,
            clock: Clock::monotonic(),
            done: false,
        };
        EngineShard {
            ctx,
            control: ControlStage {
                cmds: s.cmds,
                deferred_cmd: None,
                linger: s.linger,
                linger_max: s.linger_max,
                gone_linger: s.gone_linger,
            },
            rx: RxStage { burst: Some(Box::new(Burst::new())), caps: s.rx_caps },
            channels: ChannelsStage,
            timers: TimersStage {
                arp_send: Vec::with_capacity(arp_capacity),
                arp_failed: Vec::with_capacity(arp_capacity),
            },
            tx: TxStage { report: s.report, last_report: Instant::ZERO, last_debug: 0 },
        }
    }
}

impl<P: Port + Send + 'static> Pipeline for EngineShard<P>
where
    P::Buf: Send,
{
    const STAGES: &'static [&'static str] = &["control", "rx", "channels", "timers", "tx"];

    fn start(&mut self, clock: &Clock) {
        self.ctx.clock = clock.clone();
    }

    fn poll(&mut self, now: Instant, rec: &mut Recorder) -> Work {
        let ctx = &mut self.ctx;
        // Never before a time the last turn read (the loop's clock and this clone resynchronise
        // separately).
        let now = now.max(ctx.last_now);
        ctx.last_now = now;
        let mut w = rec.run(0, now, || self.control.poll(now, ctx));
        if ctx.done {
            // Shut down: no new flows, no more traffic.
            return w;
        }
        w += rec.run(1, now, || self.rx.poll(now, ctx));
        // The receive and channel stages move `last_now` on when they did work (fresh_now).
        let now = ctx.last_now;
        w += rec.run(2, now, || self.channels.poll(now, ctx));
        let now = ctx.last_now;
        w += rec.run(3, now, || self.timers.poll(now, ctx));
        w += rec.run(4, now, || self.tx.poll(now, ctx));
        w
    }

    fn next_deadline(&self) -> Option<Instant> {
        let ctx = &self.ctx;
        let mut d = ctx.env.timers.next_deadline();
        if let Some(a) = ctx.arp.next_deadline() {
            d = Some(d.map_or(a, |x| x.min(a)));
        }
        if ctx.env.blocked || ctx.ep.has_blocked() || !ctx.env.nic.txq.is_empty() {
            let b = ctx.last_now + BLOCKED_RECHECK;
            d = Some(d.map_or(b, |x| x.min(b)));
        }
        if let Some(p) = ctx.env.nic.port.next_event() {
            d = Some(d.map_or(p, |x| x.min(p)));
        }
        // Lingering channels are checked for their last flow (and their deadline) every 1 ms.
        for s in ctx.env.channels.iter().flatten() {
            if s.linger.is_some() {
                d = Some(d.map_or(s.next_check, |x| x.min(s.next_check)));
            }
        }
        d
    }

    fn before_park(&mut self) -> bool {
        let ctx = &mut self.ctx;
        // Frames the device would not take (`txq`) do not keep the shard awake: it parks at
        // most BLOCKED_RECHECK (next_deadline) and offers them again.
        if ctx.ep.has_work() || ctx.mesh.has_input() {
            return false;
        }
        // A command or statistics request that arrived after this round's poll but before
        // the sleeping mark (the controller rings only a shard marked sleeping).
        if self.tx.report.asked.load(std::sync::atomic::Ordering::Relaxed) || self.control.has_input() {
            return false;
        }
        for s in ctx.env.channels.iter_mut().flatten() {
            s.ch.announce_sleep();
        }
        let barrier = machnet::engine::sleep_barrier();
        // What a departed (lingering) application still writes is not work.
        ctx.env.channels.iter_mut().flatten().all(|s| s.linger.is_some() || s.ch.is_idle(barrier))
    }

    fn after_park(&mut self) {
        for s in self.ctx.env.channels.iter_mut().flatten() {
            s.ch.finish_sleep();
        }
        self.ctx.env.blocked = false;
    }

    fn done(&self) -> bool {
        self.ctx.done
    }

    fn shutdown(&mut self, _now: Instant) {
        self.tx.publish(&mut self.ctx);
    }
}
