//! The `channels` stage: each channel's control requests (listen, connect, close), then up to
//! a budget of its queued messages, checked against flow ownership; a channel that broke the
//! shared-memory protocol or corrupted its memory is closed here.

use super::context::{PendingConnect, ShardCtx};
use super::{CTRL_BUDGET, NIL, TX_BUDGET};
use crate::arp::Resolve;
use arrayvec::ArrayVec;
use machnet::engine::{CtrlRequest, TxMsg};
use machnet::layout::MachnetFlow;
use machnet::ops::{CtrlOp, Status};
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_net::wire::MsgFlags;
use machnet_runtime::stage::{Stage, Work};
use machnet_transport::{FlowTuple, OutMsg, Owner};
use std::net::Ipv4Addr;

/// The channels stage keeps no state of its own: the channels are the shard's.
pub(super) struct ChannelsStage;

impl<P: Port> Stage<ShardCtx<P>> for ChannelsStage {
    fn poll(&mut self, now: Instant, ctx: &mut ShardCtx<P>) -> Work {
        let mut work = 0u32;
        for owner in 0..ctx.env.channels.len() as Owner {
            let Some(slot) = ctx.env.channels[owner as usize].as_mut() else { continue };
            if slot.linger.is_some() {
                ctx.check_linger(now, owner);
                continue;
            }
            if slot.ch.is_poisoned() {
                ctx.env.counters.channels_poisoned += 1;
                log::warn!(
                    "shard {}: channel {} of app {} corrupted its shared memory; closing it",
                    ctx.index,
                    slot.id,
                    slot.app.0
                );
                ctx.remove_owner(now, owner, "closed (corrupted)");
                continue;
            }
            // Retry a blocked delivery only once the application made room: retrying into a
            // full ring would count as work every round and the shard would never park.
            if slot.blocked && slot.ch.can_deliver() {
                slot.blocked = false;
                ctx.ep.on_writable(owner);
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
            let msgs = ctx.take_messages(owner);
            work += (reqs.len() + msgs.len()) as u32;
            for r in reqs {
                ctx.on_ctrl(now, owner, r);
            }
            for (m, tail) in msgs {
                ctx.on_message(owner, &m, tail);
            }
            if let Some(v) = ctx.env.slot(owner).and_then(|s| s.violation.or_else(|| s.ch.first_violation())) {
                // The client library never does this: the application wrote its shared memory
                // by other means. Its channel is closed; nothing else is affected.
                let c = &mut ctx.env.counters;
                c.channel_violations += 1;
                c.violations_by_reason[v as usize] += 1;
                c.channels_closed_violation += 1;
                let why = format!("closed: protocol violation ({v:?})");
                if let Some(s) = ctx.env.slot(owner) {
                    log::warn!("shard {}: channel {} of app {}: {v:?}; closing it", ctx.index, s.id, s.app.0);
                }
                ctx.remove_owner(now, owner, &why);
                work += 1;
            }
        }
        if work > 0 {
            let now = ctx.fresh_now();
            ctx.ep.flush(now, &mut ctx.env);
        }
        Work(work)
    }
}

impl<P: Port> ShardCtx<P> {
    /// Takes up to a budget of queued messages from a channel, copying each chain's links and
    /// fragment flags out of shared memory. Returns each message with its last segment.
    pub(super) fn take_messages(&mut self, owner: Owner) -> ArrayVec<(TxMsg, u32), TX_BUDGET> {
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

    pub(super) fn on_message(&mut self, owner: Owner, m: &TxMsg, tail: u32) {
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
        if let Err(e) = self.ep.send(&mut self.env, flow, &msg) {
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

    /// Whether `owner`'s application has fewer connects waiting for ARP than it may hold flows
    /// (a scan of the pending list: a control path).
    fn may_wait_for_arp(&self, owner: Owner) -> bool {
        let group = |o: Owner| self.env.channels.get(o as usize).and_then(|s| s.as_ref()).map(|s| s.group);
        let g = group(owner);
        self.pending.iter().filter(|p| group(p.owner) == g).count() < self.ep.config().max_flows_per_group
    }
}
