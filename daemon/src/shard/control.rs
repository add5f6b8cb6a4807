//! The `control` stage: commands from the controller (adopt or remove a channel, shut down),
//! and what they set off: a channel's adoption, its linger (its flows drain, then it is
//! reclaimed), and the shard's shutdown.

use super::context::{thread_cpu_ns, ShardCtx};
use super::{ChannelSlot, ShardCmd, MAX_CHANNELS_PER_SHARD};
use machnet::layout::MachnetFlow;
use machnet::ops::{Event as ChEvent, EventKind, Status};
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_runtime::stage::{Stage, Work};
use machnet_transport::Owner;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

/// Commands from the controller, and how long channels that go away may linger.
pub(super) struct ControlStage {
    pub(super) cmds: Receiver<ShardCmd>,
    /// A command `before_park` took from `cmds` (it cannot peek); handled first.
    pub(super) deferred_cmd: Option<ShardCmd>,
    pub(super) linger: Duration,
    pub(super) linger_max: Duration,
    pub(super) gone_linger: Duration,
}

impl ControlStage {
    /// Whether a command waits (taken aside for the next poll if so), or the controller is
    /// gone (which is a command to stop).
    pub(super) fn has_input(&mut self) -> bool {
        if self.deferred_cmd.is_some() {
            return true;
        }
        match self.cmds.try_recv() {
            Ok(cmd) => {
                self.deferred_cmd = Some(cmd);
                true
            }
            Err(TryRecvError::Disconnected) => true,
            Err(TryRecvError::Empty) => false,
        }
    }
}

impl<P: Port> Stage<ShardCtx<P>> for ControlStage {
    fn poll(&mut self, now: Instant, ctx: &mut ShardCtx<P>) -> Work {
        let mut n = 0;
        loop {
            let cmd = match self.deferred_cmd.take() {
                Some(c) => Ok(c),
                None => self.cmds.try_recv(),
            };
            match cmd {
                Ok(ShardCmd::AddChannel(slot)) => {
                    n += 1;
                    ctx.adopt(*slot);
                }
                Ok(ShardCmd::RemoveChannel { id, gone }) => {
                    n += 1;
                    if let Some(owner) = ctx.owner_of_channel(id) {
                        // A detached channel's flows drain while they make progress (as a
                        // closed TCP socket's do), up to linger_max; a dead application's
                        // peers learn of its death within gone_linger, progress or not.
                        let (idle, max) = if gone {
                            let g = self.gone_linger.min(self.linger);
                            (g, g)
                        } else {
                            (self.linger, self.linger_max.max(self.linger))
                        };
                        ctx.start_linger(now, owner, idle, max);
                    }
                }
                Ok(ShardCmd::Capture(tap)) => {
                    n += 1;
                    match &tap {
                        Some(_) => log::info!("shard {}: packet capture started", ctx.index),
                        None if ctx.env.nic.tap.is_some() => log::info!("shard {}: packet capture stopped", ctx.index),
                        None => {}
                    }
                    ctx.env.nic.tap = tap.map(|mut t| {
                        t.now = now;
                        t
                    });
                }
                Ok(ShardCmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                    ctx.shutdown(now);
                    return Work(n + 1);
                }
                Err(TryRecvError::Empty) => return Work(n),
            }
        }
    }
}

impl<P: Port> ShardCtx<P> {
    pub(super) fn adopt(&mut self, slot: ChannelSlot) {
        let cpu0 = thread_cpu_ns();
        self.adopt_inner(slot);
        self.note_channel_op(cpu0);
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

    pub(super) fn owner_of_channel(&self, id: u64) -> Option<Owner> {
        self.env.channels.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id)).map(|i| i as Owner)
    }

    /// The application detached the channel or died: its listeners close now; its flows close
    /// gracefully, so what it queued still reaches the peers; the channel is reclaimed when the
    /// last flow is gone, or its flows are reset when they made no progress (nothing newly
    /// acknowledged) for `idle`, or `max` after the start.
    pub(super) fn start_linger(&mut self, now: Instant, owner: Owner, idle: Duration, max: Duration) {
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
                self.on_message(owner, &m, tail);
            }
        }
        let Some(slot) = self.env.slot(owner) else { return };
        slot.linger = Some(now + idle.min(max));
        slot.linger_idle = idle;
        slot.linger_end = now + max;
        slot.linger_mark = (usize::MAX, 0);
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

    pub(super) fn shutdown(&mut self, now: Instant) {
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
}
