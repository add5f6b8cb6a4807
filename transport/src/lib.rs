//! The Machnet transport as a sans-IO state machine.
//!
//! An [`Endpoint`] holds the flows of one shard: a fixed-capacity arena addressed by
//! [`FlowId`] handles, a 4-tuple map and the listener table; its local ports come from a
//! [`PortAllocator`] (a type parameter, [`LocalPorts`] by default). It never
//! reads a clock and never does I/O: packets ([`Endpoint::handle`]), application messages
//! ([`Endpoint::send`]), timer expiries ([`Endpoint::on_timer`]) and `now` go in; frames to
//! transmit, messages to deliver, timer deadlines and events go out through the [`Env`] trait,
//! which the caller implements (the daemon over DPDK mbufs and shared-memory channels; tests
//! over in-memory slabs in virtual time).
//!
//! Payload bytes never pass through this crate's state: a message is a chain of *segments*
//! (one per packet, at most the MSS) that the environment stores, and the transport moves
//! segment handles between its rings. After an endpoint is created nothing allocates.
//!
//! # Protocol summary (docs/protocol.md has the full account)
//!
//! * Handshake: SYN (random ISN) → SYN-ACK (a SYN cookie for ISN, ackno = peer ISN + 1) → ACK;
//!   a final ACK whose half-open flow a SYN flood evicted rebuilds it from the cookie. A lost final ACK
//!   cannot wedge the server: the client's first DATA makes it send its SYN-ACK again, which
//!   the client answers with the ACK (DATA itself does not establish a flow: it carries none of
//!   the server's numbers, so a forged source could send it). SYNs and SYN-ACKs are retransmitted with exponential backoff. A SYN to a port nobody
//!   listens on is answered with RST.
//! * Data: one sequence number per DATA packet; fragment flags FIRST/MORE/LAST; messages are
//!   delivered whole, in order, exactly once.
//! * Acknowledgement: a pure ACK carries the cumulative `ackno`, a 256-bit SACK bitmap (bit
//!   order in `net::wire::SackBitmap`) and count, and echoes the DATA timestamp for RTT. ACKs
//!   are coalesced per received burst ([`Endpoint::flush`]).
//! * Loss recovery: SACK-based loss marking with a reordering threshold of 3, fast retransmit on
//!   3 duplicate ACKs, RTO per RFC 6298 with a floor (1 ms default), exponential backoff, and
//!   RST plus [`Event::FlowFailed`] once the peer stayed silent for [`Config::peer_timeout`].
//! * Congestion control: [`cc::CongestionControl`]: `Fixed(window)` for parity with the
//!   original, or `Swift` (delay-based AIMD).
//! * Back-pressure: when the application cannot take a message, the flow stops consuming its
//!   receive ring, so `ackno` stops advancing and the sender, limited to one receive window
//!   beyond it, stalls without loss; the window update goes out as soon as the message is
//!   delivered.
//! * Close: graceful (drain, then RST) or abort (RST now); the peer sees
//!   [`Event::PeerClosed`].
//!
//! # Compatibility with original Machnet peers
//!
//! Wire-compatible: original DATA packets carry `ackno = 0xFFFFFFFF` (ignored here, as there);
//! original ACKs echo timestamp 0, which marks the peer as *legacy*: its SACK words are not
//! trusted (they are garbled, spec §6.4), its `sack_count` is, RTT falls back to Karn samples,
//! and at most 64 packets are kept in flight (its reassembly window).
//!
//! # Without the standard library
//!
//! With its `std` feature off (on by default) the crate is `#![no_std]` and needs only
//! `alloc`; nothing else changes (`examples/nostd-embed` embeds two endpoints that way). The
//! embedder supplies the clock (`now` arguments), the [`Env`] (buffers, delivery, timers) and a
//! [`PortAllocator`].
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

mod admission;
pub mod cc;
pub(crate) mod cookie;
mod endpoint;
mod env;
mod flow;
mod ports;
pub mod seq;
pub mod timer;

pub use admission::RxAdmission;
pub use endpoint::{Endpoint, EndpointStats, FlowInfo};
pub use env::Env;
pub use flow::FlowState;
pub use ports::{ClientPortQuery, LocalPorts, PortAllocator};

use core::fmt;
use core::net::Ipv4Addr;
use core::time::Duration;
use machnet_net::wire::EthernetAddress;

/// Opaque owner of flows and listeners (the daemon's channel slot). Events and segments are
/// addressed to owners.
pub type Owner = u32;

/// Handle of a payload segment held by the environment (a channel buffer index in the daemon).
pub type Seg = u32;

/// Handle of a flow: an arena index and a generation, so a stale handle never reaches a
/// flow that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId {
    index: u32,
    gen: u32,
}

impl FlowId {
    /// Arena index (stable for the flow's lifetime; reused after it ends).
    pub fn index(self) -> u32 {
        self.index
    }
    /// Generation of the arena slot.
    pub fn generation(self) -> u32 {
        self.gen
    }
    /// Rebuilds a handle from its parts (for callers that store handles in shared tables).
    pub fn from_parts(index: u32, gen: u32) -> Self {
        FlowId { index, gen }
    }
}

/// A flow's addresses, from the local point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// Local IPv4 address.
    pub local_ip: Ipv4Addr,
    /// Local UDP port.
    pub local_port: u16,
    /// Remote IPv4 address.
    pub remote_ip: Ipv4Addr,
    /// Remote UDP port.
    pub remote_port: u16,
}

impl fmt::Display for FlowTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} -> {}:{}", self.local_ip, self.local_port, self.remote_ip, self.remote_port)
    }
}

/// A message for transmission: a chain of `count` segments starting at `head`, linked by
/// [`Env::tx_next`], `len` bytes in all. Every segment except the last holds exactly the MSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutMsg {
    /// First segment.
    pub head: Seg,
    /// Last segment.
    pub tail: Seg,
    /// Number of segments.
    pub count: u32,
    /// Total bytes.
    pub len: u32,
}

/// A received message ready for delivery: `count` segments from `head` to `tail`, linked with
/// [`Env::link_rx`] in order, `len` bytes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InMsg {
    /// First segment.
    pub head: Seg,
    /// Last segment.
    pub tail: Seg,
    /// Number of segments.
    pub count: u32,
    /// Total bytes.
    pub len: u32,
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// No SYN-ACK after all retries.
    Timeout,
    /// The peer answered with RST (nobody listens on that port).
    Refused,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectError::Timeout => "connection timed out",
            ConnectError::Refused => "connection refused",
        })
    }
}

/// Something the owner of a flow should learn about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An active open completed.
    Connected {
        /// The new flow.
        flow: FlowId,
        /// Its addresses.
        tuple: FlowTuple,
        /// The token passed to [`Endpoint::connect`].
        token: u64,
    },
    /// An active open failed; the flow is gone.
    ConnectFailed {
        /// The token passed to [`Endpoint::connect`].
        token: u64,
        /// Why.
        error: ConnectError,
    },
    /// A peer connected to one of the owner's listeners.
    Accepted {
        /// The new flow.
        flow: FlowId,
        /// Its addresses.
        tuple: FlowTuple,
    },
    /// The peer closed or reset the flow; everything received before was delivered; the flow
    /// is gone.
    PeerClosed {
        /// The flow.
        flow: FlowId,
        /// Its addresses.
        tuple: FlowTuple,
    },
    /// The peer stopped answering (silent for [`Config::peer_timeout`] while we retransmitted);
    /// an RST was sent and the flow is gone.
    FlowFailed {
        /// The flow.
        flow: FlowId,
        /// Its addresses.
        tuple: FlowTuple,
    },
    /// A graceful close finished: all data was acknowledged, RST sent, the flow is gone.
    Closed {
        /// The flow.
        flow: FlowId,
        /// Its addresses.
        tuple: FlowTuple,
    },
}

/// Errors of the endpoint's API calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The flow handle is stale or invalid.
    NoSuchFlow,
    /// The flow is not established (or is closing) and cannot take messages.
    NotEstablished,
    /// The port is already taken (listener or client flow).
    PortInUse,
    /// No source port steers replies to this shard.
    NoPortAvailable,
    /// The flow arena is full.
    TooManyFlows,
    /// The message is empty or larger than the configured maximum.
    BadMessage,
    /// A listener table or other fixed table is full.
    TableFull,
    /// The caller does not own this listener or flow.
    NotOwner,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::NoSuchFlow => "no such flow",
            Error::NotEstablished => "flow not established",
            Error::PortInUse => "port in use",
            Error::NoPortAvailable => "no source port available",
            Error::TooManyFlows => "too many flows",
            Error::BadMessage => "message is empty or too large",
            Error::TableFull => "table full",
            Error::NotOwner => "not the owner",
        })
    }
}

impl core::error::Error for Error {}

/// The endpoint's local addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr {
    /// The port's MAC.
    pub mac: EthernetAddress,
    /// The IPv4 address this endpoint owns.
    pub ip: Ipv4Addr,
}

/// Retransmissions a silent peer must have left unanswered (besides [`Config::peer_timeout`]
/// of silence) before its flow fails: after a long pause of our own (the process was not
/// scheduled), answers already queued to us are read before the flow is judged.
pub const MIN_UNANSWERED_PROBES: u8 = 3;

/// Transport parameters. Defaults in parentheses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Largest payload per packet (1418, from MTU 1500).
    pub mss: usize,
    /// Flows per endpoint; memory for all of them is reserved at creation (4096). Setting it
    /// with [`Config::with_max_flows`] scales the half-open and per-group limits with it.
    pub max_flows: usize,
    /// Receive window and send-window cap in packets; a power of two ≤ 256, the span of the
    /// SACK bitmap (256).
    pub window: usize,
    /// Largest message (8 MiB).
    pub max_message: usize,
    /// Congestion control (Swift with its defaults).
    pub cc: cc::CcConfig,
    /// Retransmission timeout floor (1 ms).
    pub rto_min: Duration,
    /// RTO before the first RTT sample, and for SYN / SYN-ACK (5 ms).
    pub rto_initial: Duration,
    /// Cap of the backed-off RTO (100 ms).
    pub rto_max: Duration,
    /// How long a peer may stay silent while we wait for it before the flow fails (5 s): an
    /// established flow with data outstanding whose peer sent nothing at all (no ACK, no
    /// data) for this long, and which sent at least [`MIN_UNANSWERED_PROBES`] retransmissions
    /// since, is reset and reported failed. A peer that answers probes is never failed, however
    /// slowly it makes progress (a full receive pool, a starved process). The retransmission
    /// timer keeps backing off to `rto_max` meanwhile. A handshake's server side keeps a
    /// half-open flow as long.
    pub peer_timeout: Duration,
    /// Optionally, also fail after this many consecutive timeouts without any acknowledgement
    /// (the count-based rule of earlier versions; `None`, the default, uses time alone).
    pub max_rto_retries: Option<u32>,
    /// SYN (and SYN-ACK) transmissions before a handshake is abandoned (9).
    pub syn_retries: u32,
    /// Cap of the backed-off handshake timeout (1 s): with the defaults SYNs go out at 0, 5,
    /// 15, 35, 75, 155, 315, 635 and 1275 ms and a connect nobody answers fails after ≈ 2.3 s.
    /// A refused connect (RST) fails within one round trip regardless. Handshakes back off
    /// further than data because a SYN lost to an overloaded host (a flood of connects, a
    /// starved process) should not fail the connection.
    pub syn_rto_max: Duration,
    /// Seed for initial sequence numbers and hashing (set it from the OS at start-up).
    pub seed: u64,
    /// Half-open (SYN received, not yet acknowledged) flows at most (a quarter of
    /// `max_flows`). A SYN beyond it evicts the oldest half-open flow, never an established one,
    /// and a connect or a SYN that finds the arena full does the same: a SYN flood cannot crowd
    /// out real connections, and a real client's half-open flow lives until the flood has sent
    /// this many newer SYNs (its final ACK takes one round trip).
    pub max_half_open: usize,
    /// Half-open flows from one remote IP at most (a quarter of `max_half_open`, 256): one
    /// source cannot fill the half-open budget by itself; its further SYNs are dropped (a real
    /// client host opening many connections at once retries them).
    pub max_half_open_per_source: usize,
    /// Established and client flows one group of owners (the daemon: one application) may
    /// hold (`max_flows` less a sixteenth, 3840 of 4096): one application cannot take every
    /// flow of the shard, the rest stays for the others. Its connects beyond it fail with `TooManyFlows`, SYNs to its listeners are
    /// dropped, and a half-open flow that would establish past it is reset.
    pub max_flows_per_group: usize,
    /// Offer, and accept, acknowledgements carried in DATA (on). Between machnet-rs peers that
    /// both offer it at the handshake ([`MsgFlags::ACKS_IN_DATA`]), DATA carries the cumulative
    /// ACK, the SACK state and the timestamp echo, and a pure ACK goes out only when no DATA
    /// leaves for the flow within `ack_delay`. Original peers get pure ACKs as always.
    ///
    /// [`MsgFlags::ACKS_IN_DATA`]: machnet_net::wire::MsgFlags::ACKS_IN_DATA
    pub piggyback_acks: bool,
    /// How long an owed ACK may wait for DATA to carry it, on flows that carry ACKs in DATA
    /// (5 µs; zero: only DATA leaving in the same pass carries it). Out-of-order arrivals and
    /// every 16th unacknowledged packet are acknowledged at once. At most a quarter of
    /// `rto_min`, so the sender's loss recovery and round-trip samples are not disturbed (the
    /// echo excludes the wait: the receiver adds the time it held the packet).
    pub ack_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mss: machnet_net::wire::consts::DEFAULT_MSS,
            max_flows: 4096,
            window: 256,
            max_message: 8 << 20,
            cc: cc::CcConfig::default(),
            rto_min: Duration::from_millis(1),
            rto_initial: Duration::from_millis(5),
            rto_max: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(5),
            max_rto_retries: None,
            syn_retries: 9,
            syn_rto_max: Duration::from_secs(1),
            seed: 0x5eed,
            max_half_open: 1024,
            max_half_open_per_source: 256,
            max_flows_per_group: 3840,
            piggyback_acks: true,
            ack_delay: Duration::from_micros(5),
        }
    }
}

impl Config {
    /// This configuration with `n` flows, the half-open budget a quarter of them and the
    /// per-group limit all but a sixteenth (at least one each).
    pub fn with_max_flows(self, n: usize) -> Config {
        let max_half_open = (n / 4).max(1);
        Config {
            max_flows: n,
            max_half_open,
            max_half_open_per_source: (max_half_open / 4).max(1),
            max_flows_per_group: n.saturating_sub((n / 16).max(1)).max(1),
            ..self
        }
    }

    /// Checks the parameters; returns what is wrong.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.mss == 0 || self.mss > 9000 {
            return Err("mss must be in 1..=9000");
        }
        if !self.window.is_power_of_two() || self.window > 256 {
            return Err("window must be a power of two no larger than 256");
        }
        if self.max_flows == 0 || self.max_flows > (1 << 24) {
            return Err("max_flows must be in 1..=16777216");
        }
        if self.max_message == 0 {
            return Err("max_message must be positive");
        }
        if self.rto_min.is_zero() || self.rto_min > self.rto_max || self.rto_initial > self.rto_max {
            return Err("need 0 < rto_min <= rto_max and rto_initial <= rto_max");
        }
        if self.syn_rto_max < self.rto_initial {
            return Err("need rto_initial <= syn_rto_max");
        }
        if self.max_rto_retries == Some(0) || self.syn_retries == 0 {
            return Err("retry counts must be positive");
        }
        if self.peer_timeout < self.rto_max {
            return Err("peer_timeout must be at least rto_max");
        }
        // Limits above max_flows act as max_flows (the endpoint clamps them).
        if self.max_half_open == 0 {
            return Err("max_half_open must be at least 1");
        }
        if self.max_half_open_per_source == 0 {
            return Err("max_half_open_per_source must be at least 1");
        }
        if self.max_flows_per_group == 0 {
            return Err("max_flows_per_group must be at least 1");
        }
        if self.ack_delay > self.rto_min / 4 {
            return Err("ack_delay must be at most a quarter of rto_min");
        }
        self.cc.validate()
    }
}
