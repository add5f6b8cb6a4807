//! The shard context: what every stage works on (the endpoint, the transport's environment
//! with the channels and the port's transmit side, the ARP table, connects waiting for ARP,
//! the hand-off mesh), and the operations more than one stage performs.

use super::env::ShardEnv;
use super::ChannelSlot;
use crate::arp::ArpTable;
use crate::mesh::{Handoff, Mesh};
use crate::ports::ShardEndpoint;
use machnet::layout::MachnetFlow;
use machnet::ops::Status;
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_net::wire::EthernetAddress;
use machnet_runtime::clock::Clock;
use machnet_runtime::idle::FdSet;
use machnet_transport::{LocalAddr, Owner};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

/// CPU time of the calling thread, ns (a system call: only for rare operations).
pub(super) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A connect waiting for ARP.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingConnect {
    pub(super) owner: Owner,
    pub(super) id: u64,
    pub(super) remote_ip: Ipv4Addr,
    pub(super) remote_port: u16,
}

/// The state the stages share.
pub(super) struct ShardCtx<P: Port> {
    pub(super) index: usize,
    pub(super) ep: ShardEndpoint,
    pub(super) env: ShardEnv<P>,
    pub(super) arp: ArpTable,
    pub(super) local: LocalAddr,
    pub(super) fds: FdSet,
    pub(super) pending: Vec<PendingConnect>,
    pub(super) mesh: Mesh<P::Buf>,
    pub(super) graveyard: SyncSender<Box<ChannelSlot>>,
    /// The time of this loop, moved on by [`fresh_now`](Self::fresh_now) after a stage that
    /// did work (what later stages of the turn use).
    pub(super) last_now: Instant,
    /// A clone of the shard loop's clock ([`Pipeline::start`]; `CLOCK_MONOTONIC` until then).
    pub(super) clock: Clock,
    /// Shut down: no new flows, no more traffic.
    pub(super) done: bool,
}

impl<P: Port> ShardCtx<P> {
    /// The time now, never before this turn's: after a stage that handled a burst (tens of
    /// microseconds for a burst of full frames), what is sent next is stamped, and timers are
    /// checked, with the time it leaves rather than the turn's start. Stamped at the start, each
    /// round trip it gave would be long by the whole stage.
    pub(super) fn fresh_now(&mut self) -> Instant {
        let t = self.clock.now().max(self.last_now);
        self.last_now = t;
        t
    }

    /// Records the CPU time of a channel operation that began at `cpu0`.
    pub(super) fn note_channel_op(&mut self, cpu0: u64) {
        let c = &mut self.env.counters.max_channel_op_cpu_ns;
        *c = (*c).max(thread_cpu_ns().saturating_sub(cpu0));
    }

    /// Finishes a lingering channel whose flows are gone or whose time is up; moves its
    /// deadline on while its flows make progress.
    pub(super) fn check_linger(&mut self, now: Instant, owner: Owner) {
        let Some(slot) = self.env.slot(owner) else { return };
        if slot.linger.is_none() || now < slot.next_check {
            return;
        }
        let mark = self.ep.drain_progress(owner);
        let Some(slot) = self.env.slot(owner) else { return };
        slot.next_check = now + Duration::from_millis(1);
        if mark != slot.linger_mark {
            slot.linger_mark = mark;
            slot.linger = Some((now + slot.linger_idle).min(slot.linger_end));
        }
        let deadline = slot.linger.unwrap_or(now);
        if mark.0 == 0 {
            self.remove_owner(now, owner, "closed");
        } else if now >= deadline {
            self.env.counters.linger_expired += 1;
            self.remove_owner(now, owner, "closed (linger expired, flows reset)");
        }
    }

    /// Closes an owner's flows (RST to peers), reclaims its buffers, forgets the channel.
    pub(super) fn remove_owner(&mut self, now: Instant, owner: Owner, why: &str) {
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

    pub(super) fn send_arp_request(&mut self, ip: Ipv4Addr) {
        if self.mesh.shards() > 1 {
            // Before the request leaves: the answer reaches whichever shard owns queue 0, which
            // must know it was asked for (see crate::arp), and reads the mesh before its queue.
            self.mesh.broadcast(Handoff::ArpAsked { ip });
        }
        if self.env.nic.send_arp_request(self.local, ip) {
            self.env.counters.arp_requests += 1;
        }
    }

    /// Connects (or fails, with `mac == None`) every connect waiting for `ip`.
    pub(super) fn run_pending(&mut self, now: Instant, ip: Ipv4Addr, mac: Option<EthernetAddress>) {
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

    pub(super) fn connect_now(&mut self, now: Instant, p: PendingConnect, mac: EthernetAddress) {
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

    pub(super) fn complete(&mut self, owner: Owner, id: u64, result: Result<MachnetFlow, Status>) {
        if let Some(s) = self.env.slot(owner) {
            let _ = s.ch.complete(id, result);
        }
    }
}
