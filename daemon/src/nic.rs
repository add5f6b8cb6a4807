//! What every user of a port queue needs besides the transport: a transmit burst, and the
//! answers to ARP and ICMP echo. Shared by the daemon's shards and the embedded mode.

use crate::arp::{ArpTable, Learned};
use crate::capture::{Dir, Tap};
use machnet_net::port::{Burst, PacketBuf, Port};
use machnet_net::time::Instant;
use machnet_net::wire::{
    classify, emit_arp, ArpOperation, ArpRepr, ChecksumCaps, EthernetAddress, Frame, FrameRepr, IcmpEchoKind,
    MachnetFrame, FRAME_HEADER_LEN,
};
use machnet_runtime::wheel::{TimerId, TimerWheel};
use machnet_transport::{FlowId, LocalAddr};
use std::net::Ipv4Addr;

/// The transmit side of a port queue: frames are built in the port's buffers and queued in a
/// burst, which goes to the device when full or when flushed.
pub struct PortTx<P: Port> {
    /// The port.
    pub port: P,
    /// Frames waiting for the device.
    pub txq: Burst<P::Buf>,
    /// Checksum handling for transmitted frames (the port's capabilities).
    pub caps: ChecksumCaps,
    /// Frames dropped: no buffer, or a frame that would not build.
    pub dropped: u64,
    /// A packet capture in progress (`machnetctl capture`).
    pub tap: Option<Box<Tap>>,
    /// Frames at the head of `txq` already captured.
    captured: usize,
    /// Frames built and queued, ever (what a caller compares to see whether a flush built any).
    pub built: u64,
}

impl<P: Port> PortTx<P> {
    /// Wraps `port`.
    pub fn new(port: P) -> Self {
        let caps = port.capabilities().checksum;
        PortTx { port, txq: Burst::new(), caps, dropped: 0, tap: None, captured: 0, built: 0 }
    }

    /// Sends what is queued; what the device refuses stays queued (the caller retries).
    pub fn flush(&mut self) -> usize {
        if let Some(t) = self.tap.as_deref_mut() {
            // Each frame once, however many flushes it waits.
            let now = t.now;
            for b in self.txq.iter().skip(self.captured) {
                t.frame(Dir::Out, now, b.frame());
            }
            self.captured = self.txq.len();
        }
        let mut sent = 0;
        for _ in 0..4 {
            if self.txq.is_empty() {
                break;
            }
            let n = self.port.tx_burst(&mut self.txq);
            sent += n;
            if n == 0 {
                break;
            }
        }
        self.captured = self.captured.saturating_sub(sent);
        sent
    }

    /// A buffer to build a frame in, flushing first if the burst is full.
    pub fn buf(&mut self) -> Option<P::Buf> {
        if self.txq.is_full() {
            self.flush();
            if self.txq.is_full() {
                return None;
            }
        }
        self.port.alloc()
    }

    /// Builds and queues a frame with `build` (returns the length, or `None` to drop it).
    pub fn send_raw(&mut self, build: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        let Some(mut buf) = self.buf() else {
            self.dropped += 1;
            return false;
        };
        match build(buf.storage_mut()) {
            Some(len) => {
                buf.set_len(len);
                self.txq.push(buf);
                self.built += 1;
                true
            }
            None => {
                self.port.free(buf);
                false
            }
        }
    }

    /// Queues a Machnet frame: `fill` writes the payload after the headers and returns its
    /// length. `false` if no buffer is available now (the transport retries); a frame that
    /// does not build is dropped and counted (and reported sent).
    pub fn send_frame(&mut self, frame: &FrameRepr, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let Some(mut buf) = self.buf() else { return false };
        let storage = buf.storage_mut();
        let n = fill(&mut storage[FRAME_HEADER_LEN..]);
        match frame.emit(storage, n, self.caps) {
            Ok(len) => {
                buf.set_len(len);
                self.txq.push(buf);
                self.built += 1;
            }
            Err(_) => {
                self.port.free(buf);
                self.dropped += 1;
            }
        }
        true
    }

    /// Broadcasts an ARP request for `ip`.
    pub fn send_arp_request(&mut self, local: LocalAddr, ip: Ipv4Addr) -> bool {
        let req = ArpRepr::request(local.mac, local.ip, ip);
        self.send_raw(|buf| emit_arp(buf, local.mac, EthernetAddress::BROADCAST, &req).ok())
    }
}

/// What a received frame was, after ARP and ICMP echo were answered.
pub enum Rx<'a> {
    /// A Machnet frame for our MAC, for the transport.
    Machnet(MachnetFrame<'a>),
    /// ARP for our IP: a request (answered: `replied`) or a reply (`learned`: what it did to
    /// the table; see [`crate::arp`] for what is believed).
    Arp {
        /// Sender IP.
        ip: Ipv4Addr,
        /// Sender MAC.
        mac: EthernetAddress,
        /// `Some` for a reply: whether it completed a resolution of ours.
        learned: Option<Learned>,
        /// A request was answered.
        replied: bool,
    },
    /// An ICMP echo request for us, answered (`false`: no buffer to answer with).
    Icmp(bool),
    /// Not for us, or malformed.
    Dropped,
}

/// Parses `frame` (checksums per `caps`), answers ARP and ICMP echo for `local` through `tx`,
/// learns ARP mappings into `arp`, and returns what it was.
pub fn handle_frame<'a, P: Port>(
    tx: &mut PortTx<P>,
    arp: &mut ArpTable,
    local: LocalAddr,
    frame: &'a [u8],
    caps: ChecksumCaps,
    now: Instant,
) -> Rx<'a> {
    match classify(frame, caps) {
        Ok(Frame::Machnet(m)) if m.dst_mac == local.mac => Rx::Machnet(m),
        // Gratuitous ARP names its sender as the target too: never ours (see crate::arp).
        Ok(Frame::Arp { arp: a, .. }) if a.target_protocol_addr == local.ip && a.source_protocol_addr != local.ip => {
            let (mut replied, mut learned) = (false, None);
            if a.operation == ArpOperation::Request {
                // Answered; its sender fields teach the table nothing.
                let reply = ArpRepr::reply_to(&a, local.mac);
                replied = tx
                    .send_raw(|buf| emit_arp(buf, reply.source_hardware_addr, reply.target_hardware_addr, &reply).ok());
            } else if a.target_hardware_addr == local.mac {
                learned = Some(arp.on_reply(a.source_protocol_addr, a.source_hardware_addr, now));
            }
            Rx::Arp { ip: a.source_protocol_addr, mac: a.source_hardware_addr, learned, replied }
        }
        Ok(Frame::Icmp(icmp))
            if icmp.echo.kind == IcmpEchoKind::Request
                && icmp.ip.dst_addr == local.ip
                && icmp.eth.dst_addr == local.mac =>
        {
            let caps = tx.caps;
            Rx::Icmp(tx.send_raw(|buf| icmp.emit_reply(buf, local.mac, caps).ok()))
        }
        _ => Rx::Dropped,
    }
}

/// One timer per flow on a timing wheel, as [`Env::set_timer`](machnet_transport::Env)
/// wants them.
pub struct FlowTimers {
    wheel: TimerWheel<FlowId>,
    timers: Vec<Option<TimerId>>,
    fired: Vec<FlowId>,
    /// Deadlines the wheel could not hold (it was full).
    pub overflow: u64,
}

impl FlowTimers {
    /// Room for `max_flows` flows' timers, the wheel anchored at `now`.
    pub fn new(max_flows: usize, now: Instant) -> Self {
        FlowTimers {
            wheel: TimerWheel::new(max_flows + 64, now),
            timers: vec![None; max_flows],
            fired: Vec::with_capacity(max_flows + 64),
            overflow: 0,
        }
    }

    /// Arms (or with `None`, cancels) `flow`'s timer.
    pub fn set(&mut self, flow: FlowId, at: Option<Instant>) {
        let i = flow.index() as usize;
        if let Some(id) = self.timers[i].take() {
            self.wheel.cancel(id);
        }
        if let Some(at) = at {
            match self.wheel.insert(at, flow) {
                Ok(id) => self.timers[i] = Some(id),
                Err(_) => self.overflow += 1,
            }
        }
    }

    /// True when [`expire`](Self::expire) at `now` may fire something (one comparison; poll
    /// loops ask this every turn).
    #[inline]
    pub fn may_expire(&self, now: Instant) -> bool {
        self.wheel.may_expire(now)
    }

    /// The flows whose timers are due at `now`, disarmed, for the caller to fire (the list is
    /// reused: give it back with [`done`](Self::done)).
    pub fn expire(&mut self, now: Instant) -> Vec<FlowId> {
        let mut fired = core::mem::take(&mut self.fired);
        self.wheel.expire(now, |f| fired.push(f));
        for f in &fired {
            self.timers[f.index() as usize] = None;
        }
        fired
    }

    /// Returns the list [`expire`](Self::expire) handed out.
    pub fn done(&mut self, mut fired: Vec<FlowId>) {
        fired.clear();
        self.fired = fired;
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.wheel.next_deadline()
    }
}
