//! One flow: its state and the protocol logic that touches only that flow.
//!
//! The endpoint owns the arena and the maps; it lends a flow's state and its two slot rings to
//! a [`FlowCx`] together with the environment, and acts on the returned [`Verdict`].

use crate::cc::CongestionControl;
use crate::endpoint::{EndpointStats, FlowCounters};
use crate::env::Env;
use crate::seq;
use crate::timer::{backoff, backoff_ns, RttEstimator};
use crate::{Config, ConnectError, Event, FlowId, FlowTuple, InMsg, LocalAddr, Owner, Seg, MIN_UNANSWERED_PROBES};
use core::net::Ipv4Addr;
use core::time::Duration;
use machnet_net::time::{dur_nanos, Instant};
use machnet_net::wire::{EthernetAddress, FrameRepr, MachnetRepr, MsgFlags, PacketType, SackBitmap};

/// Lifecycle of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Client: SYN sent, waiting for SYN-ACK.
    SynSent,
    /// Server: SYN-ACK sent, waiting for the final ACK (which must acknowledge our ISN).
    SynReceived,
    /// Data flows both ways.
    Established,
    /// Our graceful close: no new messages; RST once everything queued is acknowledged.
    Closing,
    /// The peer reset the flow; a received message still waits for delivery.
    PeerClosed,
}

/// Receive window of original Machnet peers (its reassembly window, spec §6.4).
pub(crate) const LEGACY_WINDOW: u32 = 64;
/// SACKed packets above a hole before the hole counts as lost.
const DUP_THRESH: u32 = 3;
/// Marks a slot without a segment (the SYN / SYN-ACK sequence number).
pub(crate) const NO_SEG: Seg = Seg::MAX;
/// Owner used for frames that carry no payload of anybody's.
pub(crate) const NO_OWNER: Owner = Owner::MAX;

pub(crate) mod fl {
    /// The peer is an original Machnet (timestamp 0 in its handshake).
    pub const LEGACY: u16 = 1 << 0;
    /// An ACK is owed.
    pub const ACK_PENDING: u16 = 1 << 1;
    /// In the endpoint's work queue.
    pub const IN_WORK: u16 = 1 << 2;
    /// The armed timer is a tail-loss probe, not the retransmission timeout.
    pub const PROBE_ARMED: u16 = 1 << 9;
    /// A tail-loss probe went out since the last cumulative progress.
    pub const PROBED: u16 = 1 << 10;
    /// We opened it (its local port is ours to release).
    pub const CLIENT: u16 = 1 << 3;
    /// In loss recovery until `snd_una` passes `recover`.
    pub const RECOVERY: u16 = 1 << 4;
    /// `train` is a complete message waiting for delivery.
    pub const HAS_PENDING: u16 = 1 << 5;
    /// The last delivery attempt was refused (back-pressure).
    pub const BLOCKED: u16 = 1 << 6;
    /// The last transmit attempt found no buffer.
    pub const TX_STALLED: u16 = 1 << 7;
    /// The slot holds a live flow.
    pub const LIVE: u16 = 1 << 8;
    /// On the endpoint's blocked list (kept across slot reuse, like `IN_WORK`, so a slot is
    /// never listed twice).
    pub const PARKED: u16 = 1 << 11;
    /// A first retransmission timeout resent only the oldest packet (F-RTO); the next ACK
    /// decides whether the rest is resent too.
    pub const FRTO: u16 = 1 << 13;
    /// Counted in the endpoint's half-open budget (a server flow not yet established).
    pub const HALF_OPEN: u16 = 1 << 14;
    /// Out of the 4-tuple map: a reset flow that only waits to deliver its last message no
    /// longer receives, so a new connection on the same ports (a restarted peer) is not
    /// mistaken for it.
    pub const UNMAPPED: u16 = 1 << 12;
    /// Both ends offered ACKs in DATA at the handshake: our DATA carries them, the peer's
    /// DATA is read for them, timestamps are split (see [`MachnetRepr::split_timestamp`]), and
    /// an owed ACK may wait `ack_delay` for DATA to carry it.
    pub const PIGGY: u16 = 1 << 15;
}

/// Unacknowledged in-order packets after which an ACK goes out at once, not delayed.
const ACK_EVERY: u32 = 16;

/// The full 64-bit time (ns) of a 32-bit timestamp within ~2.1 s of `now`, before or after it.
/// An echo a little after the time its ACK was read (a receive time taken early, or the peer's
/// clock running a little fast over the time it held the packet) is a time after `now`, which
/// gives no round-trip sample, not one of 4.29 s less a little.
#[inline]
fn widen(now: u64, v: u32) -> u64 {
    now.wrapping_add_signed(i64::from(v.wrapping_sub(now as u32) as i32))
}

/// A sent DATA packet awaiting acknowledgement.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TxSlot {
    pub seg: Seg,
    pub flags: u8,
    pub state: u8,
    pub sent_at: u64,
}

pub(crate) mod ts {
    /// Selectively acknowledged by the peer.
    pub const SACKED: u8 = 1;
    /// Deemed lost; waiting for retransmission.
    pub const LOST: u8 = 2;
    /// Retransmitted in the current loss episode.
    pub const RETX: u8 = 4;
    /// Ever retransmitted (Karn: no RTT sample from it).
    pub const EVER_RETX: u8 = 8;
}

/// A received DATA packet held in the receive ring.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RxSlot {
    pub seg: Seg,
    pub len: u16,
    pub flags: u8,
}

/// Per-flow state: everything touched per packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    pub gen: u32,
    pub owner: Owner,
    /// Index of the peer's [`Path`] in the endpoint.
    pub path: u32,
    pub flags: u16,
    pub state: FlowState,
    pub dupacks: u8,
    pub rto_count: u8,
    pub rto_shift: u8,
    pub remote_mac: EthernetAddress,
    pub remote_port: u16,
    pub local_port: u16,
    pub remote_ip: u32,
    // Send side. During the handshake `snd_una` is our ISN and `snd_nxt` is ISN + 1.
    pub snd_una: u32,
    pub snd_nxt: u32,
    pub sacked: u16,
    pub lost: u16,
    pub peer_held: u16,
    pub high_sacked: u32,
    pub recover: u32,
    pub retx_cursor: u32,
    pub loss_scan: u32,
    pub pend_head: Seg,
    pub pend_tail: Seg,
    pub pend_count: u32,
    pub rto_at: u64,
    pub timer_at: u64,
    /// When the peer was last heard from (any packet of this flow), ns.
    pub last_heard: u64,
    /// Deadline of a delayed ACK (ns; 0: none armed).
    pub ack_at: u64,
    /// `rcv_nxt` that our last ACK (pure or in DATA) carried.
    pub acked_rcv: u32,
    /// µs timestamp of the first retransmission timeout of an unresolved episode (0: none),
    /// and the window before it, for undoing a spurious timeout (Eifel, RFC 3522).
    pub rto_mark: u32,
    pub cwnd_saved: f32,
    /// Low 32 bits of the last echoed timestamp used as an RTT sample.
    pub last_echo: u32,
    pub rtt: RttEstimator,
    pub cc: CongestionControl,
    // Receive side.
    pub irs: u32,
    pub rcv_nxt: u32,
    pub held: SackBitmap,
    /// When the packet whose timestamp `echo_ts` holds was received (ns; 0: nothing fresh to
    /// echo).
    pub echo_rx: u64,
    /// The message being reassembled, or with `HAS_PENDING` the complete one awaiting delivery
    /// (consumption stops while one waits, so the two never coexist).
    pub train: InMsg,
    pub echo_ts: u64,
}

impl Flow {
    pub(crate) fn empty() -> Self {
        let none = InMsg { head: NO_SEG, tail: NO_SEG, count: 0, len: 0 };
        Flow {
            gen: 0,
            owner: NO_OWNER,
            path: 0,
            flags: 0,
            state: FlowState::Established,
            dupacks: 0,
            rto_count: 0,
            rto_shift: 0,
            remote_mac: EthernetAddress::ZERO,
            remote_port: 0,
            local_port: 0,
            remote_ip: 0,
            snd_una: 0,
            snd_nxt: 0,
            sacked: 0,
            lost: 0,
            peer_held: 0,
            high_sacked: 0,
            recover: 0,
            retx_cursor: 0,
            loss_scan: 0,
            pend_head: NO_SEG,
            pend_tail: NO_SEG,
            pend_count: 0,
            rto_at: 0,
            timer_at: 0,
            last_heard: 0,
            ack_at: 0,
            acked_rcv: 0,
            rto_mark: 0,
            cwnd_saved: 0.0,
            last_echo: 0,
            rtt: RttEstimator::new(),
            cc: CongestionControl::Fixed { window: 1 },
            irs: 0,
            rcv_nxt: 0,
            held: SackBitmap::new(),
            echo_rx: 0,
            train: none,
            echo_ts: 0,
        }
    }

    #[inline]
    pub(crate) fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    #[inline]
    pub(crate) fn set(&mut self, f: u16) {
        self.flags |= f;
    }
    #[inline]
    pub(crate) fn clear(&mut self, f: u16) {
        self.flags &= !f;
    }

    pub(crate) fn tuple(&self, local: &LocalAddr) -> FlowTuple {
        FlowTuple {
            local_ip: local.ip,
            local_port: self.local_port,
            remote_ip: Ipv4Addr::from(self.remote_ip),
            remote_port: self.remote_port,
        }
    }

    /// Packets the peer can hold beyond `snd_una`.
    #[inline]
    pub(crate) fn peer_window(&self, cfg: &Config) -> u32 {
        let w = cfg.window as u32;
        if self.has(fl::LEGACY) {
            w.min(LEGACY_WINDOW)
        } else {
            w
        }
    }

    /// Sequence numbers sent and not cumulatively acknowledged.
    #[inline]
    pub(crate) fn outstanding(&self) -> u32 {
        self.snd_nxt.wrapping_sub(self.snd_una)
    }

    /// Packets believed in the network (RFC 6675 "pipe").
    #[inline]
    pub(crate) fn pipe(&self) -> u32 {
        let held = if self.has(fl::LEGACY) { self.peer_held } else { self.sacked };
        self.outstanding().saturating_sub(u32::from(held)).saturating_sub(u32::from(self.lost))
    }

    /// The earliest of the retransmission and delayed-ACK deadlines (ns; 0: none).
    #[inline]
    pub(crate) fn deadline(&self) -> u64 {
        match (self.rto_at, self.ack_at) {
            (0, a) => a,
            (r, 0) => r,
            (r, a) => r.min(a),
        }
    }

    /// True if nothing is queued or in flight.
    #[inline]
    pub(crate) fn tx_idle(&self) -> bool {
        self.pend_count == 0 && self.snd_una == self.snd_nxt
    }
}

/// State of the path to one peer IP, shared by the flows to it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Path {
    pub ip: u32,
    pub flows: u32,
    /// Half-open flows from this peer.
    pub half_open: u32,
    /// Windowed minimum RTT (ns): the smaller of this epoch's and the last epoch's minimum.
    pub min_cur: u64,
    pub min_prev: u64,
    pub epoch_start: u64,
}

/// Length of one epoch of the windowed base-RTT minimum.
const PATH_EPOCH_NS: u64 = 10_000_000_000;

impl Path {
    pub(crate) fn new(ip: u32) -> Self {
        Path { ip, flows: 0, half_open: 0, min_cur: u64::MAX, min_prev: u64::MAX, epoch_start: 0 }
    }

    fn sample(&mut self, now: Instant, ns: u64) {
        if now.as_nanos().saturating_sub(self.epoch_start) > PATH_EPOCH_NS {
            self.min_prev = self.min_cur;
            self.min_cur = u64::MAX;
            self.epoch_start = now.as_nanos();
        }
        self.min_cur = self.min_cur.min(ns);
    }

    /// The path's base RTT in nanoseconds.
    fn base(&self) -> Option<u64> {
        let m = self.min_cur.min(self.min_prev);
        (m != u64::MAX).then_some(m)
    }
}

/// What the endpoint must do with the flow after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep it.
    Keep,
    /// Free it; `Some` event first goes to the owner.
    Free(Option<Event>),
}

/// A flow lent out together with everything its logic needs.
pub(crate) struct FlowCx<'a, E: Env> {
    pub id: FlowId,
    pub f: &'a mut Flow,
    pub tx: &'a mut [TxSlot],
    pub rx: &'a mut [RxSlot],
    pub c: &'a mut FlowCounters,
    pub path: &'a mut Path,
    pub cfg: &'a Config,
    pub local: LocalAddr,
    pub env: &'a mut E,
    pub stats: &'a mut EndpointStats,
    pub now: Instant,
    /// When the packet being handled arrived (the kernel's time where known, else `now`).
    pub rx_at: Instant,
}

impl<E: Env> FlowCx<'_, E> {
    #[inline]
    fn mask(&self) -> u32 {
        self.cfg.window as u32 - 1
    }

    #[inline]
    fn stamp(&self) -> u64 {
        self.now.as_nanos().max(1)
    }

    fn frame(&self, hdr: MachnetRepr) -> FrameRepr {
        FrameRepr {
            src_mac: self.local.mac,
            dst_mac: self.f.remote_mac,
            src_ip: self.local.ip,
            dst_ip: Ipv4Addr::from(self.f.remote_ip),
            src_port: self.f.local_port,
            dst_port: self.f.remote_port,
            hdr,
        }
    }

    fn send_control(&mut self, ty: PacketType, seqno: u32, ackno: u32, timestamp: u64) -> bool {
        self.send_header(MachnetRepr { timestamp, ..MachnetRepr::control(ty, seqno, ackno) })
    }

    fn send_header(&mut self, hdr: MachnetRepr) -> bool {
        let frame = self.frame(hdr);
        let ok = self.env.transmit(NO_OWNER, &frame, None);
        if !ok {
            self.stats.tx_no_buffer += 1;
        }
        ok
    }

    /// The retransmission timeout now (backed off), in nanoseconds.
    #[inline]
    fn rto_ns(&self) -> u64 {
        let max = dur_nanos(self.cfg.rto_max);
        let base = self.f.rtt.rto_ns(dur_nanos(self.cfg.rto_initial), dur_nanos(self.cfg.rto_min), max);
        backoff_ns(base, u32::from(self.f.rto_shift), max)
    }

    fn arm_rto(&mut self) {
        self.f.clear(fl::PROBE_ARMED);
        // Tail-loss probe (after RFC 8985): when nothing new can follow the outstanding packets
        // (the queue is empty or the window is full), a lost tail would get no duplicate ACKs
        // and wait a whole RTO; probe after two smoothed RTTs instead. One probe per flight.
        let can_send_more =
            self.f.pend_count > 0 && self.can_send() && self.f.outstanding() < self.f.peer_window(self.cfg);
        if !can_send_more && self.f.rtt.has_sample() && !self.f.has(fl::PROBED | fl::RECOVERY) {
            // Not earlier than the longest round trip seen lately either: a probe is for a lost
            // tail, not for an ACK that is merely as late as others were.
            let pto = (2 * self.f.rtt.srtt_ns()).max(self.f.rtt.recent_max_ns()).max(2_000);
            if pto < self.rto_ns() {
                self.f.set(fl::PROBE_ARMED);
                self.f.rto_at = self.now.as_nanos().saturating_add(pto);
                return;
            }
        }
        self.f.rto_at = self.now.as_nanos().saturating_add(self.rto_ns());
    }

    /// Retransmits the newest unacknowledged packet to elicit an ACK with SACK information.
    fn send_probe(&mut self) {
        let mask = self.mask();
        let mut s = self.f.snd_nxt.wrapping_sub(1);
        while seq::ge(s, self.f.snd_una) {
            let slot = self.tx[(s & mask) as usize];
            if slot.seg != NO_SEG && slot.state & ts::SACKED == 0 {
                if self.transmit_data(s, &slot) {
                    let st = &mut self.tx[(s & mask) as usize];
                    st.state |= ts::EVER_RETX;
                    st.sent_at = self.now.as_nanos();
                    self.stats.tail_probes += 1;
                    self.stats.tx_retransmits += 1;
                    self.c.retransmits += 1;
                } else {
                    self.stats.tx_no_buffer += 1;
                }
                return;
            }
            s = s.wrapping_sub(1);
        }
    }

    /// How long the peer has been silent.
    fn silent(&self) -> Duration {
        Duration::from_nanos(self.now.as_nanos().saturating_sub(self.f.last_heard))
    }

    fn handshake_timeout(&self) -> Duration {
        backoff(self.cfg.rto_initial, u32::from(self.f.rto_shift), self.cfg.syn_rto_max)
    }

    // ---------------------------------------------------------------------------------------
    // Handshake
    // ---------------------------------------------------------------------------------------

    /// Sends our SYN again now (the peer's MAC changed), without counting it as a retry.
    pub(crate) fn resend_syn(&mut self) {
        if self.f.state == FlowState::SynSent {
            self.send_syn();
        }
    }

    /// Our handshake flags: the offer of ACKs in DATA (a SYN-ACK only answers one).
    fn handshake_flags(&self, ty: PacketType) -> MsgFlags {
        let offer = match ty {
            PacketType::Syn => self.cfg.piggyback_acks,
            _ => self.f.has(fl::PIGGY),
        };
        if offer {
            MsgFlags::ACKS_IN_DATA
        } else {
            MsgFlags::empty()
        }
    }

    fn send_syn(&mut self) {
        let hdr = MachnetRepr {
            msg_flags: self.handshake_flags(PacketType::Syn),
            timestamp: self.stamp(),
            ..MachnetRepr::control(PacketType::Syn, self.f.snd_una, 0)
        };
        self.send_header(hdr);
    }

    /// Starts an active open: SYN with the flow's ISN.
    pub(crate) fn start_connect(&mut self, iss: u32) {
        self.f.state = FlowState::SynSent;
        self.f.last_heard = self.now.as_nanos();
        self.f.snd_una = iss;
        self.f.snd_nxt = iss.wrapping_add(1);
        self.tx[(iss & self.mask()) as usize] =
            TxSlot { seg: NO_SEG, sent_at: self.now.as_nanos(), ..TxSlot::default() };
        self.f.rto_shift = 0;
        self.send_syn();
        self.f.rto_at = (self.now + self.handshake_timeout()).as_nanos();
    }

    /// Takes the peer's offer of ACKs in DATA from its SYN (a server) or SYN-ACK (a client).
    fn negotiate(&mut self, hdr: &MachnetRepr) {
        if self.cfg.piggyback_acks && hdr.timestamp != 0 && hdr.msg_flags.contains(MsgFlags::ACKS_IN_DATA) {
            self.f.set(fl::PIGGY);
        } else {
            self.f.clear(fl::PIGGY);
        }
    }

    /// Starts a passive open from a SYN; sends the SYN-ACK if `synack` (not for a flow rebuilt
    /// from a cookie: the client has it).
    pub(crate) fn start_accept(&mut self, syn: &MachnetRepr, iss: u32, synack: bool) {
        self.f.last_heard = self.now.as_nanos();
        if syn.timestamp == 0 {
            self.f.set(fl::LEGACY);
        }
        self.negotiate(syn);
        self.f.state = FlowState::SynReceived;
        self.f.irs = syn.seqno;
        self.f.rcv_nxt = syn.seqno.wrapping_add(1);
        self.f.acked_rcv = self.f.rcv_nxt;
        self.f.snd_una = iss;
        self.f.snd_nxt = iss.wrapping_add(1);
        self.tx[(iss & self.mask()) as usize] =
            TxSlot { seg: NO_SEG, sent_at: self.now.as_nanos(), ..TxSlot::default() };
        self.f.rto_shift = 0;
        if synack {
            self.send_synack();
        } else {
            // When the SYN-ACK left is unknown: no round-trip sample from the handshake.
            self.tx[(iss & self.mask()) as usize].state |= ts::EVER_RETX;
        }
        self.f.rto_at = (self.now + self.handshake_timeout()).as_nanos();
    }

    fn send_synack(&mut self) {
        let hdr = MachnetRepr {
            msg_flags: self.handshake_flags(PacketType::SynAck),
            timestamp: self.stamp(),
            ..MachnetRepr::control(PacketType::SynAck, self.f.snd_una, self.f.rcv_nxt)
        };
        self.send_header(hdr);
    }

    fn send_ack_now(&mut self) -> bool {
        let held = self.f.held;
        // The echo carries the sender's timestamp plus the time this end held the packet (from
        // its arrival to this ACK), so the sender measures network delay only; without a fresh
        // packet to answer for, no echo at all.
        let echo = match self.echo_now() {
            0 => 0,
            e if self.f.has(fl::PIGGY) => u64::from((e as u32).max(1)),
            e => e,
        };
        let hdr = MachnetRepr {
            packet_type: PacketType::Ack,
            msg_flags: MsgFlags::empty(),
            seqno: self.f.snd_nxt,
            ackno: self.f.rcv_nxt,
            sack: held,
            sack_count: held.count() as u16,
            timestamp: echo,
        };
        let frame = self.frame(hdr);
        if self.env.transmit(NO_OWNER, &frame, None) {
            self.acked();
            self.stats.tx_acks += 1;
            true
        } else {
            self.stats.tx_no_buffer += 1;
            false
        }
    }

    /// The echo an ACK sent now carries: the timestamp of the newest fresh packet plus the
    /// time we held it (0: nothing fresh to answer for).
    #[inline]
    fn echo_now(&self) -> u64 {
        if self.f.echo_ts != 0 && self.f.echo_rx != 0 {
            self.f.echo_ts.wrapping_add(self.now.as_nanos().saturating_sub(self.f.echo_rx))
        } else {
            0
        }
    }

    /// An ACK of everything received went out (pure or in DATA).
    #[inline]
    fn acked(&mut self) {
        self.f.clear(fl::ACK_PENDING);
        self.f.echo_rx = 0;
        self.f.ack_at = 0;
        self.f.acked_rcv = self.f.rcv_nxt;
    }

    /// An RST carrying our position, then nothing more.
    pub(crate) fn send_rst(&mut self) {
        let (s, a) = (self.f.snd_nxt, self.f.rcv_nxt);
        self.send_control(PacketType::Rst, s, a, 0);
        self.stats.tx_rsts += 1;
    }

    fn established_from_handshake(&mut self) {
        self.f.state = FlowState::Established;
        let iss = self.f.snd_una;
        self.f.snd_una = iss.wrapping_add(1);
        // Karn: a sample only if the handshake packet went out once.
        let slot = self.tx[(iss & self.mask()) as usize];
        if self.f.rto_shift == 0 && slot.state & ts::EVER_RETX == 0 {
            let sent = slot.sent_at;
            let sample = self.now.as_nanos().saturating_sub(sent);
            self.f.rtt.sample_full_ns(self.now, sample);
            self.f.rtt.sample_fabric_ns(self.now, sample);
            self.path.sample(self.now, sample);
        }
        self.f.rto_shift = 0;
        self.f.rto_count = 0;
        self.f.rto_at = 0;
        self.f.cc = CongestionControl::new(&self.cfg.cc);
        self.f.retx_cursor = self.f.snd_una;
        self.f.loss_scan = self.f.snd_una;
        self.f.high_sacked = self.f.snd_una;
    }

    // ---------------------------------------------------------------------------------------
    // Input
    // ---------------------------------------------------------------------------------------

    /// One Machnet packet for this flow.
    pub(crate) fn on_packet(
        &mut self,
        hdr: &MachnetRepr,
        payload: &[u8],
        src_mac: EthernetAddress,
        token: u64,
    ) -> Verdict {
        let half_open = self.f.state == FlowState::SynReceived;
        let v = self.dispatch(hdr, payload, src_mac, token);
        // A half-open flow hears its client only in a SYN again or in what establishes it:
        // anything else (forged, or the SYN-ACK of another half-open flow that a forged SYN
        // opened on the peer for the same ports, each keeping the other alive) is no sign of
        // a client, and the half-open flow times out as if it had not come.
        if !half_open || hdr.packet_type == PacketType::Syn || self.f.state != FlowState::SynReceived {
            self.f.last_heard = self.now.as_nanos();
        }
        v
    }

    fn dispatch(&mut self, hdr: &MachnetRepr, payload: &[u8], src_mac: EthernetAddress, token: u64) -> Verdict {
        match hdr.packet_type {
            PacketType::Data if self.f.has(fl::PIGGY) => {
                // The acknowledgement first (it may free transmit buffers for the answer, or
                // establish a server flow whose final ACK was lost: its `ackno` proves the
                // client saw our SYN-ACK), then the data. As in TCP (RFC 793 §3.9), only an
                // acceptable segment's acknowledgement counts: one whose sequence number lies
                // within a window of `rcv_nxt` (a retransmission below it included) and whose
                // length is one a peer sends.
                let (sent, echo) = MachnetRepr::unsplit_timestamp(hdr.timestamp);
                let w = self.cfg.window as u32;
                let acceptable =
                    seq::in_range(hdr.seqno, self.f.rcv_nxt.wrapping_sub(w), self.f.rcv_nxt.wrapping_add(w))
                        && (1..=self.cfg.mss).contains(&payload.len());
                // Nothing to learn: no new cumulative ACK, no SACK, no echo (a one-way stream's
                // DATA acknowledging what we never sent, or the later packets of a burst that
                // all carry the same ackno): skip the acknowledgement's work. Such an ACK is
                // no duplicate ACK either, so nothing is lost by skipping it.
                let idle = hdr.ackno == self.f.snd_una
                    && echo == 0
                    && hdr.sack_count == 0
                    && self.f.state != FlowState::SynReceived;
                if acceptable && !idle {
                    let ack = MachnetRepr { packet_type: PacketType::Ack, timestamp: u64::from(echo), ..*hdr };
                    if let Verdict::Free(ev) = self.on_ack(&ack, false) {
                        return Verdict::Free(ev);
                    }
                }
                self.on_data(hdr, u64::from(sent), payload)
            }
            PacketType::Data => self.on_data(hdr, hdr.timestamp, payload),
            PacketType::Ack => self.on_ack(hdr, true),
            PacketType::Syn => {
                self.on_syn(hdr, src_mac);
                Verdict::Keep
            }
            PacketType::SynAck => self.on_synack(hdr, token),
            PacketType::Rst => self.on_rst(hdr, token),
            PacketType::Unknown(_) => {
                self.stats.rx_unknown_type += 1;
                Verdict::Keep
            }
        }
    }

    fn on_syn(&mut self, hdr: &MachnetRepr, src_mac: EthernetAddress) {
        match self.f.state {
            FlowState::SynReceived => {
                if hdr.seqno != self.f.irs {
                    // The client restarted with a new ISN before anything was exchanged.
                    self.f.irs = hdr.seqno;
                    self.f.rcv_nxt = hdr.seqno.wrapping_add(1);
                    self.f.acked_rcv = self.f.rcv_nxt;
                }
                self.negotiate(hdr);
                // Our SYN-ACK was lost (or went to a wrong MAC): answer again from here. Only
                // our own timer counts towards giving up: a client's retries must not hasten it.
                self.f.remote_mac = src_mac;
                self.send_synack();
            }
            FlowState::Established | FlowState::Closing if hdr.seqno != self.f.irs => {
                // A new SYN on the ports of a connection we still have: the peer restarted and
                // its port choice met our stale flow. Answer with our position (RFC 5961's
                // challenge ACK): the peer, in SYN_SENT, resets this flow with an RST that
                // only it can get right, and its next SYN finds the ports free.
                self.stats.syn_challenged += 1;
                self.send_ack_now();
            }
            _ => self.stats.rx_unexpected += 1,
        }
    }

    fn on_synack(&mut self, hdr: &MachnetRepr, token: u64) -> Verdict {
        match self.f.state {
            FlowState::SynSent if hdr.ackno == self.f.snd_nxt => {
                if hdr.timestamp == 0 {
                    self.f.set(fl::LEGACY);
                }
                self.negotiate(hdr);
                self.f.irs = hdr.seqno;
                self.f.rcv_nxt = hdr.seqno.wrapping_add(1);
                self.f.acked_rcv = self.f.rcv_nxt;
                self.established_from_handshake();
                self.f.echo_ts = hdr.timestamp;
                self.f.echo_rx = self.rx_at.as_nanos();
                self.send_ack_now();
                let tuple = self.f.tuple(&self.local);
                self.env.event(self.f.owner, Event::Connected { flow: self.id, tuple, token });
                Verdict::Keep
            }
            FlowState::Established | FlowState::Closing if hdr.seqno == self.f.irs => {
                // Our handshake ACK was lost; the server repeats its SYN-ACK.
                self.f.echo_ts = hdr.timestamp;
                self.f.echo_rx = self.rx_at.as_nanos();
                self.send_ack_now();
                Verdict::Keep
            }
            _ => {
                self.stats.rx_unexpected += 1;
                Verdict::Keep
            }
        }
    }

    fn on_rst(&mut self, hdr: &MachnetRepr, token: u64) -> Verdict {
        match self.f.state {
            FlowState::SynSent => {
                if hdr.ackno == self.f.snd_nxt || hdr.seqno == 0 {
                    self.stats.connect_refused += 1;
                    return Verdict::Free(Some(Event::ConnectFailed { token, error: ConnectError::Refused }));
                }
                Verdict::Keep
            }
            FlowState::PeerClosed => Verdict::Keep,
            _ => {
                let w = self.cfg.window as u32;
                // Accept an RST anywhere in the receive window (the original sends snd_nxt,
                // which may be ahead of what we received when it aborts), or one that answers
                // a DATA packet we sent (ackno = its seqno + 1: the peer has no flow for it).
                let answers_ours = hdr.seqno == 0
                    && seq::gt(hdr.ackno, self.f.snd_una)
                    && seq::le(hdr.ackno, self.f.snd_nxt)
                    && matches!(self.f.state, FlowState::Established | FlowState::Closing);
                if !answers_ours && !seq::in_range(hdr.seqno, self.f.rcv_nxt, self.f.rcv_nxt.wrapping_add(w)) {
                    self.stats.rx_rst_ignored += 1;
                    return Verdict::Keep;
                }
                self.stats.rx_rsts += 1;
                if self.f.state == FlowState::SynReceived {
                    return Verdict::Free(None);
                }
                if self.f.has(fl::HAS_PENDING) && !self.try_deliver() {
                    // Deliver what was complete before the reset; the flow lingers for that.
                    self.f.state = FlowState::PeerClosed;
                    self.release_all_but_pending();
                    return Verdict::Keep;
                }
                let tuple = self.f.tuple(&self.local);
                Verdict::Free(Some(Event::PeerClosed { flow: self.id, tuple }))
            }
        }
    }

    /// DATA `hdr` carrying `payload`; `timestamp` is the sender's (the high half of a split
    /// one).
    fn on_data(&mut self, hdr: &MachnetRepr, timestamp: u64, payload: &[u8]) -> Verdict {
        match self.f.state {
            FlowState::Established | FlowState::Closing => {}
            FlowState::SynReceived if hdr.seqno == self.f.rcv_nxt => {
                // The client's final ACK was lost and its first DATA arrives. DATA proves
                // nothing: it carries no number of ours, so whoever forged the SYN can send it
                // without having seen our SYN-ACK, and a flow established by it would be a
                // forged source's, outside the half-open budget for good. Send the SYN-ACK
                // again instead: the client, established, answers it with an ACK of our ISN,
                // which establishes us; the DATA, dropped unacknowledged, comes again (the
                // client's tail probe or timeout).
                self.stats.rx_unproven_data += 1;
                let iss = self.f.snd_una;
                // Karn: the ACK may answer either SYN-ACK; no RTT sample from it.
                self.tx[(iss & self.mask()) as usize].state |= ts::EVER_RETX;
                self.send_synack();
                return Verdict::Keep;
            }
            _ => {
                self.stats.rx_unexpected += 1;
                return Verdict::Keep;
            }
        }
        if payload.is_empty() || payload.len() > self.cfg.mss {
            self.stats.rx_bad_length += 1;
            return Verdict::Keep;
        }
        // An acknowledgement already owed (for an earlier packet of this burst) stays owed
        // whatever happens to this one.
        let owed = self.f.has(fl::ACK_PENDING);
        self.f.set(fl::ACK_PENDING);
        let d = seq::diff(hdr.seqno, self.f.rcv_nxt);
        if d < 0 {
            self.stats.rx_duplicate += 1;
            return Verdict::Keep;
        }
        let d = d as usize;
        if d >= self.cfg.window {
            self.stats.rx_out_of_window += 1;
            return Verdict::Keep;
        }
        if self.f.held.get(d) {
            self.stats.rx_duplicate += 1;
            return Verdict::Keep;
        }
        let flags = hdr.msg_flags & (MsgFlags::FIRST | MsgFlags::MORE | MsgFlags::LAST | MsgFlags::NOTIFY_DELIVERY);
        let completes = d == 0 && flags.contains(MsgFlags::LAST);
        if !self.env.admit_rx(self.f.owner, self.id, completes, self.now) {
            // Refused (pool low and not this flow's turn, or nothing free at all): giving up
            // the highest out-of-order packet may make room for this lower one, as when an
            // allocation fails below.
            if !(self.renege_above(d) && self.env.admit_rx(self.f.owner, self.id, completes, self.now)) {
                return self.drop_no_buffer(d, owed);
            }
        }
        let seg = match self.env.alloc_rx(self.f.owner, payload, flags) {
            Some(seg) => seg,
            None => match self.renege_above(d) {
                // Out of buffers while holding later packets: give up the highest of them so a
                // lower one can be stored. Without this a pool full of out-of-order packets
                // could never take the packet that fills the hole.
                true => match self.env.alloc_rx(self.f.owner, payload, flags) {
                    Some(seg) => seg,
                    None => return self.drop_no_buffer(d, owed),
                },
                false => return self.drop_no_buffer(d, owed),
            },
        };
        // Echo the timestamp of new packets only: a duplicate carries the time of an earlier
        // transmission, and echoing it would inflate the sender's RTT estimate (RFC 7323 §4.3).
        if timestamp != 0 {
            self.f.echo_ts = timestamp;
            self.f.echo_rx = self.rx_at.as_nanos();
        }
        let slot = RxSlot { seg, len: payload.len() as u16, flags: flags.bits() };
        self.stats.rx_data += 1;
        if d == 0 && self.f.held.is_empty() && !self.f.has(fl::HAS_PENDING) {
            // The next packet expected, nothing held behind it and no message waiting for the
            // application: consumed at once, as `advance` would, without holding it in the
            // ring and the bitmap first.
            self.f.rcv_nxt = self.f.rcv_nxt.wrapping_add(1);
            self.append(slot);
            if self.f.has(fl::HAS_PENDING) {
                self.try_deliver();
            }
            return Verdict::Keep;
        }
        self.rx[(hdr.seqno & self.mask()) as usize] = slot;
        self.f.held.set(d);
        if d == 0 {
            self.advance();
        }
        Verdict::Keep
    }

    fn drop_no_buffer(&mut self, d: usize, owed: bool) -> Verdict {
        // No buffer: drop; the sender retransmits. Only the next packet expected is
        // acknowledged (a duplicate ACK, no progress): its retransmission after a timeout is
        // the sender's probe, and the answer tells it the receiver is alive and merely full, so
        // the flow waits (backing off to rto_max) instead of failing. Acknowledging every
        // dropped packet would invite fast retransmissions into a full pool.
        self.stats.rx_no_buffer += 1;
        if d != 0 && !owed {
            self.f.clear(fl::ACK_PENDING);
        }
        Verdict::Keep
    }

    /// Frees the highest held packet if it lies above distance `d`.
    fn renege_above(&mut self, d: usize) -> bool {
        match self.f.held.highest() {
            Some(h) if h > d => {
                let seq = self.f.rcv_nxt.wrapping_add(h as u32);
                let seg = self.rx[(seq & self.mask()) as usize].seg;
                self.env.free_rx(self.f.owner, seg);
                self.f.held.clear(h);
                self.stats.rx_reneged += 1;
                true
            }
            _ => false,
        }
    }

    /// Consumes in-order packets into messages and delivers complete ones, stopping when the
    /// application refuses a message (back-pressure).
    pub(crate) fn advance(&mut self) {
        loop {
            if self.f.has(fl::HAS_PENDING) && !self.try_deliver() {
                return;
            }
            if !self.f.held.get(0) {
                return;
            }
            let slot = self.rx[(self.f.rcv_nxt & self.mask()) as usize];
            self.f.held.shift_down(1);
            self.f.rcv_nxt = self.f.rcv_nxt.wrapping_add(1);
            self.f.set(fl::ACK_PENDING);
            self.append(slot);
        }
    }

    #[inline(always)]
    fn append(&mut self, slot: RxSlot) {
        let flags = MsgFlags::from_bits_retain(slot.flags);
        let owner = self.f.owner;
        let len = u32::from(slot.len);
        if flags.contains(MsgFlags::FIRST) {
            if self.f.train.count > 0 {
                // A new message began before the last one ended: the peer is broken.
                self.env.free_rx_chain(owner, self.f.train.head, self.f.train.count);
                self.stats.rx_bad_framing += 1;
            }
            self.f.train = InMsg { head: slot.seg, tail: slot.seg, count: 1, len };
        } else if self.f.train.count == 0 {
            // A fragment without a first fragment.
            self.env.free_rx(owner, slot.seg);
            self.stats.rx_bad_framing += 1;
            return;
        } else {
            self.env.link_rx(owner, self.f.train.tail, slot.seg);
            self.f.train.tail = slot.seg;
            self.f.train.count += 1;
            self.f.train.len += len;
        }
        if self.f.train.len as usize > self.cfg.max_message {
            self.env.free_rx_chain(owner, self.f.train.head, self.f.train.count);
            self.f.train = InMsg { head: NO_SEG, tail: NO_SEG, count: 0, len: 0 };
            self.stats.rx_bad_framing += 1;
            return;
        }
        if flags.contains(MsgFlags::LAST) {
            self.f.set(fl::HAS_PENDING);
        }
    }

    /// Tries to hand the pending message to the application.
    pub(crate) fn try_deliver(&mut self) -> bool {
        let tuple = self.f.tuple(&self.local);
        let msg = self.f.train;
        if self.env.deliver(self.f.owner, self.id, &tuple, &msg) {
            self.f.train = InMsg { head: NO_SEG, tail: NO_SEG, count: 0, len: 0 };
            if self.f.held.is_empty() {
                // The flow holds no receive buffer now.
                self.env.rx_released(self.f.owner, self.id);
            }
            self.f.clear(fl::HAS_PENDING | fl::BLOCKED);
            self.stats.rx_messages += 1;
            self.stats.rx_bytes += u64::from(msg.len);
            self.c.rx_messages += 1;
            self.c.rx_bytes += u64::from(msg.len);
            true
        } else {
            if !self.f.has(fl::BLOCKED) {
                self.stats.deliver_blocked += 1;
            }
            self.f.set(fl::BLOCKED);
            false
        }
    }

    /// An acknowledgement: a pure ACK, or (`pure` false) the one a DATA packet carries, which
    /// is no duplicate ACK when it acknowledges nothing new (RFC 5681 §2: only pure ACKs are).
    fn on_ack(&mut self, hdr: &MachnetRepr, pure: bool) -> Verdict {
        match self.f.state {
            FlowState::Established | FlowState::Closing => {}
            FlowState::SynReceived if hdr.ackno == self.f.snd_nxt => {
                self.established_from_handshake();
                let tuple = self.f.tuple(&self.local);
                self.env.event(self.f.owner, Event::Accepted { flow: self.id, tuple });
                return Verdict::Keep;
            }
            FlowState::SynSent => {
                // An ACK before any SYN-ACK: the peer holds an older connection on these ports
                // (a challenge ACK for our SYN). Reset it (RST at its ackno, RFC 793); our SYN
                // is retransmitted on its timer and then finds the ports free.
                self.send_control(PacketType::Rst, hdr.ackno, hdr.seqno, 0);
                self.stats.tx_rsts += 1;
                return Verdict::Keep;
            }
            _ => {
                self.stats.rx_unexpected += 1;
                return Verdict::Keep;
            }
        }
        let a = hdr.ackno;
        if seq::gt(a, self.f.snd_nxt) {
            self.stats.rx_bad_ack += 1;
            return Verdict::Keep;
        }
        // Any acknowledgement proves the peer is alive.
        self.f.rto_count = 0;
        if seq::lt(a, self.f.snd_una) {
            return Verdict::Keep;
        }
        let legacy = self.f.has(fl::LEGACY);
        // The echo is the send time of the newest packet the peer accepted plus the time the
        // peer held it; `rx_at − echo` is then the network delay of that round trip (a fabric
        // sample, for congestion control). The full round trip behind the RTO comes from Karn
        // samples of packets sent once.
        let echo = (!legacy && hdr.timestamp != 0 && hdr.timestamp as u32 != self.f.last_echo).then(|| {
            if self.f.has(fl::PIGGY) {
                widen(self.rx_at.as_nanos(), hdr.timestamp as u32)
            } else {
                hdr.timestamp
            }
        });
        let mut sample = None;
        let newly = a.wrapping_sub(self.f.snd_una);
        let mask = self.mask();
        if newly > 0 {
            let last = self.tx[(a.wrapping_sub(1) & mask) as usize];
            let owner = self.f.owner;
            let mut any_retx = false;
            let mut s = self.f.snd_una;
            while s != a {
                let slot = self.tx[(s & mask) as usize];
                any_retx |= slot.state & ts::EVER_RETX != 0;
                if slot.state & ts::SACKED != 0 {
                    self.f.sacked -= 1;
                }
                if slot.state & ts::LOST != 0 {
                    self.f.lost -= 1;
                }
                if slot.seg != NO_SEG {
                    self.env.free_tx(owner, slot.seg);
                }
                s = s.wrapping_add(1);
            }
            if let Some(e) = echo {
                sample = self.echo_sample(e);
            }
            let mut frto_loss = false;
            if self.f.rto_mark != 0 {
                // The first progress after a timeout: if it acknowledges the original
                // transmission (its echo predates the timeout), the timeout was spurious — the
                // ACK was late. Undo the window cut (RFC 3522's response); retransmissions of
                // later packets go on, since some of those may really be lost.
                let mut spurious = false;
                if let Some(e) = echo {
                    let e_us = (e / 1000) as u32;
                    if (self.f.rto_mark.wrapping_sub(e_us) as i32) > 0 {
                        spurious = true;
                        self.stats.spurious_rto += 1;
                        self.f.cc.undo_timeout(self.f.cwnd_saved);
                    }
                }
                // After an F-RTO timeout, a real loss means the rest is resent now.
                frto_loss = self.f.has(fl::FRTO) && !spurious;
                self.f.clear(fl::FRTO);
                self.f.rto_mark = 0;
            }
            // Karn, as Linux applies it: no full-RTT sample from an ACK that covers any
            // retransmitted packet (a hole filled by a retransmission makes the cumulative ACK
            // jump over packets sent long ago, and timing those would measure the recovery).
            if !any_retx && last.seg != NO_SEG {
                let full = self.now.as_nanos().saturating_sub(last.sent_at);
                self.f.rtt.sample_full_ns(self.now, full);
                if legacy {
                    sample = Some(full);
                }
            }
            self.f.snd_una = a;
            self.f.dupacks = 0;
            self.f.rto_shift = 0;
            self.f.clear(fl::PROBED);
            if frto_loss && self.f.outstanding() > 0 {
                self.lose_all_outstanding();
            }
            if seq::lt(self.f.retx_cursor, a) {
                self.f.retx_cursor = a;
            }
            if seq::lt(self.f.loss_scan, a) {
                self.f.loss_scan = a;
            }
            if seq::lt(self.f.high_sacked, a) {
                self.f.high_sacked = a;
            }
            if self.f.has(fl::RECOVERY) && seq::ge(a, self.f.recover) {
                self.f.clear(fl::RECOVERY);
            }
            if let Some(s) = sample {
                self.f.rtt.sample_fabric_ns(self.now, s);
                self.path.sample(self.now, s);
                self.f.last_echo = hdr.timestamp as u32;
            }
            let base = self.path.base();
            self.f.cc.on_ack(&self.cfg.cc, self.now, newly, sample, base, &self.f.rtt);
            if self.f.snd_una == self.f.snd_nxt {
                self.f.rto_at = 0;
                self.f.clear(fl::PROBED);
            } else {
                self.arm_rto();
            }
        } else if pure && self.f.outstanding() > 0 {
            self.f.dupacks = self.f.dupacks.saturating_add(1);
            if self.f.has(fl::FRTO) {
                // The peer still lacks the oldest packet: the timeout was a loss.
                self.f.clear(fl::FRTO);
                self.lose_all_outstanding();
            }
        }

        // Selective acknowledgements and loss detection.
        let mut newly_lost = false;
        if legacy {
            self.f.peer_held = hdr.sack_count.min(self.f.outstanding().min(u32::from(u16::MAX)) as u16);
        } else if !hdr.sack.is_empty() {
            let mut advanced = false;
            for i in hdr.sack.iter() {
                let s = a.wrapping_add(i as u32);
                if !seq::in_range(s, self.f.snd_una, self.f.snd_nxt) {
                    continue;
                }
                let slot = &mut self.tx[(s & mask) as usize];
                if slot.state & ts::SACKED == 0 {
                    if slot.state & ts::LOST != 0 {
                        slot.state &= !ts::LOST;
                        self.f.lost -= 1;
                    }
                    slot.state |= ts::SACKED;
                    self.f.sacked += 1;
                    let above = s.wrapping_add(1);
                    if seq::gt(above, self.f.high_sacked) {
                        self.f.high_sacked = above;
                        advanced = true;
                    }
                }
            }
            if advanced {
                if newly == 0 {
                    if let Some(s) = echo.and_then(|e| self.echo_sample(e)) {
                        self.f.rtt.sample_fabric_ns(self.now, s);
                        self.path.sample(self.now, s);
                        self.f.last_echo = hdr.timestamp as u32;
                    }
                }
                newly_lost |= self.mark_sack_losses();
            }
        }
        if self.f.dupacks == DUP_THRESH as u8 {
            newly_lost |= self.mark_lost(self.f.snd_una);
        } else if legacy && u32::from(self.f.dupacks) > DUP_THRESH && hdr.sack_count > 0 {
            // The original's recovery: on the k-th duplicate ACK resend snd_una + (k − 3).
            let s = self.f.snd_una.wrapping_add(u32::from(self.f.dupacks) - DUP_THRESH);
            if seq::lt(s, self.f.snd_nxt) {
                newly_lost |= self.mark_lost(s);
            }
        }
        if newly_lost && !self.f.has(fl::RECOVERY) {
            self.f.set(fl::RECOVERY);
            self.f.recover = self.f.snd_nxt;
            self.stats.fast_recoveries += 1;
            self.f.cc.on_fast_recovery(&self.cfg.cc, self.now, &self.f.rtt);
            if self.f.has(fl::PROBE_ARMED) {
                // Recovery is under way: the timer guards it as an RTO, not as a tail probe.
                self.arm_rto();
            }
        }
        self.close_if_drained()
    }

    fn echo_sample(&self, echo: u64) -> Option<u64> {
        let rtt = self.rx_at.as_nanos().checked_sub(echo)?;
        (rtt < 10_000_000_000).then_some(rtt)
    }

    /// Marks one outstanding, unsacked, not yet retransmitted packet as lost.
    fn mark_lost(&mut self, s: u32) -> bool {
        if !seq::in_range(s, self.f.snd_una, self.f.snd_nxt) {
            return false;
        }
        let mask = self.mask();
        let slot = &mut self.tx[(s & mask) as usize];
        if slot.seg == NO_SEG || slot.state & (ts::SACKED | ts::LOST | ts::RETX) != 0 {
            return false;
        }
        slot.state |= ts::LOST;
        self.f.lost += 1;
        if seq::lt(s, self.f.retx_cursor) {
            self.f.retx_cursor = s;
        }
        true
    }

    /// Marks holes with at least `DUP_THRESH` sequence numbers SACKed above them.
    fn mark_sack_losses(&mut self) -> bool {
        let limit = self.f.high_sacked.wrapping_sub(DUP_THRESH);
        let mut any = false;
        let mut s = self.f.loss_scan;
        if seq::lt(s, self.f.snd_una) {
            s = self.f.snd_una;
        }
        while seq::lt(s, limit) {
            any |= self.mark_lost(s);
            s = s.wrapping_add(1);
        }
        if seq::gt(s, self.f.loss_scan) {
            self.f.loss_scan = s;
        }
        any
    }

    // ---------------------------------------------------------------------------------------
    // Output
    // ---------------------------------------------------------------------------------------

    #[inline]
    fn can_send(&self) -> bool {
        self.f.pipe() < self.f.cc.window()
    }

    fn transmit_data(&mut self, s: u32, slot: &TxSlot) -> bool {
        let flags = MsgFlags::from_bits_retain(slot.flags);
        if !self.f.has(fl::PIGGY) {
            let frame = self.frame(MachnetRepr::data(s, flags, self.stamp()));
            return self.env.transmit(self.f.owner, &frame, Some(slot.seg));
        }
        let held = self.f.held;
        let echo = match self.echo_now() {
            0 => 0,
            e => (e as u32).max(1),
        };
        let hdr = MachnetRepr {
            ackno: self.f.rcv_nxt,
            sack: held,
            sack_count: held.count() as u16,
            ..MachnetRepr::data(s, flags, MachnetRepr::split_timestamp(self.stamp(), echo))
        };
        let frame = self.frame(hdr);
        if !self.env.transmit(self.f.owner, &frame, Some(slot.seg)) {
            return false;
        }
        if self.f.has(fl::ACK_PENDING) {
            self.stats.tx_acks_in_data += 1;
        }
        self.acked();
        true
    }

    /// Sends what the windows allow: retransmissions first, then new data.
    pub(crate) fn pump(&mut self) {
        if !matches!(self.f.state, FlowState::Established | FlowState::Closing) {
            return;
        }
        let mask = self.mask();
        self.f.clear(fl::TX_STALLED);
        // Retransmissions.
        while self.f.lost > 0 && self.can_send() {
            let mut s = self.f.retx_cursor;
            if seq::lt(s, self.f.snd_una) {
                s = self.f.snd_una;
            }
            while seq::lt(s, self.f.snd_nxt) && self.tx[(s & mask) as usize].state & ts::LOST == 0 {
                s = s.wrapping_add(1);
            }
            if !seq::lt(s, self.f.snd_nxt) {
                // Counter and flags disagree: trust the flags.
                self.f.lost = 0;
                break;
            }
            let slot = self.tx[(s & mask) as usize];
            if !self.transmit_data(s, &slot) {
                self.stats.tx_no_buffer += 1;
                self.f.set(fl::TX_STALLED);
                return;
            }
            let st = &mut self.tx[(s & mask) as usize];
            st.state = (st.state & !ts::LOST) | ts::RETX | ts::EVER_RETX;
            st.sent_at = self.now.as_nanos();
            self.f.lost -= 1;
            self.f.retx_cursor = s.wrapping_add(1);
            self.stats.tx_retransmits += 1;
            self.c.retransmits += 1;
        }
        // New data.
        let window = self.f.peer_window(self.cfg);
        while self.f.pend_count > 0 && self.can_send() && self.f.outstanding() < window {
            let seg = self.f.pend_head;
            let (_, flags) = self.env.tx_meta(self.f.owner, seg);
            let slot = TxSlot { seg, flags: (flags & !MsgFlags::CHAIN).bits(), state: 0, sent_at: self.now.as_nanos() };
            let s = self.f.snd_nxt;
            if !self.transmit_data(s, &slot) {
                self.stats.tx_no_buffer += 1;
                self.f.set(fl::TX_STALLED);
                break;
            }
            self.tx[(s & mask) as usize] = slot;
            self.f.snd_nxt = s.wrapping_add(1);
            self.f.pend_count -= 1;
            if self.f.pend_count > 0 {
                match self.env.tx_next(self.f.owner, seg) {
                    Some(n) => self.f.pend_head = n,
                    None => {
                        // The chain ended early: the environment broke its own contract.
                        self.stats.tx_chain_errors += 1;
                        self.f.pend_count = 0;
                    }
                }
            }
            self.stats.tx_data += 1;
        }
        if self.f.outstanding() > 0 && self.f.rto_at == 0 {
            self.arm_rto();
        }
    }

    /// Sends an owed ACK.
    pub(crate) fn flush_ack(&mut self) {
        if self.f.has(fl::ACK_PENDING) {
            self.send_ack_now();
        }
    }

    /// After the flow's transmissions of this pass: an ACK still owed waits up to `ack_delay`
    /// for DATA to carry it, unless it reports a hole (out-of-order packets held), or
    /// `ACK_EVERY` packets wait for it, or its deadline has come.
    pub(crate) fn ack_or_delay(&mut self) {
        if !self.f.has(fl::ACK_PENDING) {
            return;
        }
        let now = self.now.as_nanos();
        let urgent = !self.f.held.is_empty() || self.f.rcv_nxt.wrapping_sub(self.f.acked_rcv) >= ACK_EVERY;
        if urgent || self.cfg.ack_delay.is_zero() || (self.f.ack_at != 0 && self.f.ack_at <= now) {
            self.send_ack_now();
        } else if self.f.ack_at == 0 {
            self.f.ack_at = (self.now + self.cfg.ack_delay).as_nanos();
            self.stats.acks_delayed += 1;
        }
    }

    /// Finishes a graceful close once everything is acknowledged.
    pub(crate) fn close_if_drained(&mut self) -> Verdict {
        if self.f.state == FlowState::Closing && self.f.tx_idle() {
            self.send_rst();
            let tuple = self.f.tuple(&self.local);
            return Verdict::Free(Some(Event::Closed { flow: self.id, tuple }));
        }
        Verdict::Keep
    }

    // ---------------------------------------------------------------------------------------
    // Timers
    // ---------------------------------------------------------------------------------------

    /// The flow's timer fired (the endpoint checked `rto_at <= now`).
    pub(crate) fn on_timeout(&mut self, token: u64) -> Verdict {
        match self.f.state {
            FlowState::SynSent => {
                if u32::from(self.f.rto_shift) + 1 >= self.cfg.syn_retries {
                    self.stats.connect_timeouts += 1;
                    return Verdict::Free(Some(Event::ConnectFailed { token, error: ConnectError::Timeout }));
                }
                self.f.rto_shift += 1;
                self.stats.syn_retransmits += 1;
                self.send_syn();
                self.f.rto_at = (self.now + self.handshake_timeout()).as_nanos();
                Verdict::Keep
            }
            FlowState::SynReceived => {
                // The client is established as soon as a SYN-ACK reaches it, so the server
                // waits longer than a client would for it: its SYN tries and then as long as
                // an established flow waits for a silent peer. A server shard that was not
                // scheduled for a while must not drop connections its clients already use.
                let tries = u32::from(self.f.rto_shift) + 1;
                let gave_up = match self.cfg.max_rto_retries {
                    Some(m) => tries >= self.cfg.syn_retries + m,
                    None => tries >= self.cfg.syn_retries && self.silent() >= self.cfg.peer_timeout,
                };
                if gave_up {
                    self.stats.accept_timeouts += 1;
                    return Verdict::Free(None);
                }
                self.f.rto_shift += 1;
                self.stats.syn_retransmits += 1;
                self.send_synack();
                self.f.rto_at = (self.now + self.handshake_timeout()).as_nanos();
                Verdict::Keep
            }
            FlowState::PeerClosed => {
                self.f.rto_at = 0;
                Verdict::Keep
            }
            FlowState::Established | FlowState::Closing => {
                if self.f.outstanding() == 0 {
                    self.f.rto_at = 0;
                    return Verdict::Keep;
                }
                if self.f.has(fl::PROBE_ARMED) {
                    self.f.set(fl::PROBED);
                    self.send_probe();
                    self.arm_rto();
                    return Verdict::Keep;
                }
                self.f.rto_count = self.f.rto_count.saturating_add(1);
                self.stats.rto_fired += 1;
                // Failure is judged by time: the peer said nothing for `peer_timeout` and left
                // several retransmissions unanswered (so a pause of our own, after which its
                // answers are still queued to us, cannot fail the flow).
                let silent = self.silent() >= self.cfg.peer_timeout && self.f.rto_count >= MIN_UNANSWERED_PROBES;
                let counted = self.cfg.max_rto_retries.is_some_and(|m| u32::from(self.f.rto_count) > m);
                if silent || counted {
                    self.send_rst();
                    self.stats.flows_failed += 1;
                    let tuple = self.f.tuple(&self.local);
                    return Verdict::Free(Some(Event::FlowFailed { flow: self.id, tuple }));
                }
                self.f.rto_shift = self.f.rto_shift.saturating_add(1);
                let first = self.f.rto_mark == 0;
                if first {
                    self.f.rto_mark = ((self.now.as_nanos() / 1000) as u32).max(1);
                    self.f.cwnd_saved = self.f.cc.cwnd() as f32;
                }
                self.f.cc.on_timeout(&self.cfg.cc, self.now, &self.f.rtt);
                if !self.f.has(fl::LEGACY) && self.f.sacked == 0 && self.f.lost == 0 {
                    // F-RTO (RFC 5682), decided by the timestamp echo (Eifel): with no sign of
                    // loss (nothing SACKed above a hole, nothing marked lost), a timeout on a
                    // busy host is most often an ACK that is merely late (its sender or we were
                    // not scheduled). Until an ACK arrives, each timeout resends only the oldest
                    // packet (as TCP's window of one does); if that ACK echoes an original
                    // transmission nothing was lost and nothing more goes out; otherwise
                    // everything unacknowledged is resent, one round trip later. With signs of
                    // loss the timeout is taken as one at once.
                    self.f.set(fl::FRTO);
                    self.resend_oldest();
                } else {
                    self.f.clear(fl::FRTO);
                    self.lose_all_outstanding();
                }
                self.f.dupacks = 0;
                self.f.set(fl::RECOVERY);
                self.f.recover = self.f.snd_nxt;
                self.arm_rto();
                self.pump();
                Verdict::Keep
            }
        }
    }

    /// Sends the oldest unacknowledged packet again, whatever the window (F-RTO's probe). Also
    /// when it is SACKed: a receiver that holds it but cannot consume it (its application does
    /// not read) answers the probe, which shows it alive.
    fn resend_oldest(&mut self) {
        let mask = self.mask();
        let s = self.f.snd_una;
        let slot = self.tx[(s & mask) as usize];
        if slot.seg == NO_SEG {
            return;
        }
        if self.transmit_data(s, &slot) {
            let st = &mut self.tx[(s & mask) as usize];
            st.state |= ts::RETX | ts::EVER_RETX;
            st.sent_at = self.now.as_nanos();
            self.stats.tx_retransmits += 1;
            self.c.retransmits += 1;
        } else {
            self.stats.tx_no_buffer += 1;
        }
    }

    /// A loss episode after a timeout: the peer may have reneged on SACKed packets (it frees
    /// them when its buffers run out), so the scoreboard is rebuilt from the next ACKs (RFC 6675
    /// §5.1); what is unacknowledged is sent again, oldest first, as the window allows.
    fn lose_all_outstanding(&mut self) {
        let mask = self.mask();
        let mut lost = 0u16;
        let mut s = self.f.snd_una;
        while s != self.f.snd_nxt {
            let slot = &mut self.tx[(s & mask) as usize];
            slot.state &= !(ts::RETX | ts::SACKED);
            if slot.seg != NO_SEG {
                slot.state |= ts::LOST;
                lost += 1;
            }
            s = s.wrapping_add(1);
        }
        self.f.sacked = 0;
        self.f.high_sacked = self.f.snd_una;
        self.f.lost = lost;
        self.f.retx_cursor = self.f.snd_una;
        self.f.loss_scan = self.f.snd_una;
    }

    // ---------------------------------------------------------------------------------------
    // Teardown
    // ---------------------------------------------------------------------------------------

    /// Returns every segment except a pending received message.
    fn release_all_but_pending(&mut self) {
        let owner = self.f.owner;
        let mask = self.mask();
        let mut s = self.f.snd_una;
        while s != self.f.snd_nxt {
            let seg = self.tx[(s & mask) as usize].seg;
            if seg != NO_SEG {
                self.env.free_tx(owner, seg);
            }
            s = s.wrapping_add(1);
        }
        self.f.snd_una = self.f.snd_nxt;
        self.f.sacked = 0;
        self.f.lost = 0;
        let mut seg = self.f.pend_head;
        let mut n = self.f.pend_count;
        while n > 0 {
            let next = self.env.tx_next(owner, seg);
            self.env.free_tx(owner, seg);
            n -= 1;
            match next {
                Some(x) => seg = x,
                None => break,
            }
        }
        self.f.pend_count = 0;
        for d in self.f.held.iter() {
            let seg = self.rx[(self.f.rcv_nxt.wrapping_add(d as u32) & mask) as usize].seg;
            self.env.free_rx(owner, seg);
        }
        self.f.held = SackBitmap::new();
        if self.f.train.count > 0 && !self.f.has(fl::HAS_PENDING) {
            self.env.free_rx_chain(owner, self.f.train.head, self.f.train.count);
            self.f.train.count = 0;
        }
        self.f.rto_at = 0;
    }

    /// Returns every segment the flow holds.
    pub(crate) fn release_all(&mut self) {
        self.release_all_but_pending();
        if self.f.has(fl::HAS_PENDING) {
            self.env.free_rx_chain(self.f.owner, self.f.train.head, self.f.train.count);
            self.f.train.count = 0;
            self.f.clear(fl::HAS_PENDING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::widen;

    /// A 32-bit timestamp widens to the 64-bit time nearest `now`: before it (an echo of a
    /// packet sent earlier, the usual case), at it, and a little after it, across a wrap of the
    /// low 32 bits too. After it must stay after it: read as 4.29 s before, such an echo gave a
    /// round-trip sample of 4.29 s and a multiplicative decrease.
    #[test]
    fn widen_takes_the_time_nearest_now() {
        let wrap = 1u64 << 32;
        for now in [10 * wrap + 5_000, 10 * wrap + (wrap - 5), 7 * wrap] {
            for t in [now - 1_000_000_000, now - 70_000, now - 1, now, now + 1, now + 3_000, now + 1_000_000] {
                assert_eq!(widen(now, t as u32), t, "now {now}, t {t}");
            }
        }
        // An echo after the time its ACK was read gives no sample (echo_sample's checked_sub).
        let now = 10 * wrap + 100;
        assert!(now.checked_sub(widen(now, (now + 200) as u32)).is_none());
    }
}
