//! The transport's environment on a shard: received payloads go to the owner channel's receive
//! buffers and ring, sent payloads come from its transmit buffers, frames go to the port's
//! transmit burst, timers to the wheel, events to the channel.

use super::{ChannelSlot, ShardCounters, NIL};
use crate::nic::{FlowTimers, PortTx};
use machnet::engine::DeliverError;
use machnet::layout::MachnetFlow;
use machnet::ops::{Event as ChEvent, EventKind, Status};
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_net::wire::{FrameRepr, MsgFlags};
use machnet_transport::{ConnectError, Env, Event, FlowId, FlowTuple, InMsg, Owner, Seg};

/// The transport's environment: channel buffers, the port's transmit side, timers, events.
pub struct ShardEnv<P: Port> {
    pub(super) nic: PortTx<P>,
    pub(super) channels: Vec<Option<ChannelSlot>>,
    pub(super) timers: FlowTimers,
    /// A delivery found an application's ring full this round.
    pub(super) blocked: bool,
    pub(super) counters: ShardCounters,
}

impl<P: Port> ShardEnv<P> {
    pub(super) fn slot(&mut self, owner: Owner) -> Option<&mut ChannelSlot> {
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
