//! The `tx` stage: owed ACKs and window-permitted data, the transmit burst, the channels'
//! doorbells, and the statistics snapshot the controller reads.

use super::context::ShardCtx;
use super::{ChannelInfo, Reporting, TOP_HALF_OPEN};
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_runtime::stage::{Stage, Work};
use machnet_transport::Owner;
use std::sync::Arc;

/// Where the shard publishes its report, and when it last did.
pub(super) struct TxStage {
    pub(super) report: Arc<Reporting>,
    pub(super) last_report: Instant,
    pub(super) last_debug: u64,
}

impl<P: Port> Stage<ShardCtx<P>> for TxStage {
    fn poll(&mut self, now: Instant, ctx: &mut ShardCtx<P>) -> Work {
        if ctx.ep.has_work() {
            ctx.ep.flush(now, &mut ctx.env);
        }
        let queued = ctx.env.nic.txq.len();
        let sent = ctx.env.nic.flush();
        for s in ctx.env.channels.iter_mut().flatten() {
            s.ch.flush();
        }
        if now.as_nanos().saturating_sub(self.last_report.as_nanos()) > 10_000_000
            || self.report.asked.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.last_report = now;
            self.publish(ctx);
        }
        Work(if queued > 0 { sent as u32 } else { 0 })
    }
}

impl TxStage {
    pub(super) fn publish<P: Port>(&mut self, ctx: &mut ShardCtx<P>) {
        ctx.env.counters.handoff_sent = ctx.mesh.sent;
        ctx.env.counters.arp_suspected = ctx.arp.suspected;
        ctx.env.counters.handoff_received = ctx.mesh.received;
        ctx.env.counters.handoff_dropped = ctx.mesh.dropped;
        ctx.env.counters.tx_dropped = ctx.env.nic.dropped;
        ctx.env.counters.timer_overflow = ctx.env.timers.overflow;
        let port = ctx.env.nic.port.stats();
        ctx.env.counters.port_rx_frames = port.rx_packets;
        ctx.env.counters.port_tx_frames = port.tx_packets;
        ctx.env.counters.port_rx_dropped = port.rx_dropped;
        if log::log_enabled!(log::Level::Debug) && self.last_report.as_nanos() / 1_000_000_000 != self.last_debug {
            self.last_debug = self.last_report.as_nanos() / 1_000_000_000;
            log::debug!(
                "shard {}: {} channels, {} flows, endpoint {:?}, shard {:?}",
                ctx.index,
                ctx.env.channels.iter().flatten().count(),
                ctx.ep.flow_count(),
                ctx.ep.stats(),
                ctx.env.counters
            );
            for f in ctx.ep.flows() {
                log::debug!("shard {}: flow {:?}", ctx.index, f);
            }
        }
        if let Ok(mut r) = self.report.report.try_lock() {
            r.channels = ctx.env.channels.iter().flatten().count();
            r.flows = ctx.ep.flow_count();
            r.half_open = ctx.ep.half_open_count();
            r.endpoint = *ctx.ep.stats();
            r.counters = ctx.env.counters;
            r.faults = ctx.env.nic.port.fault_stats();
            if r.detail_wanted > r.detail.seq {
                let now = ctx.last_now;
                let wanted = r.detail_wanted;
                let d = &mut r.detail;
                // The lists have room for everything a shard can hold (reserved at start): no
                // allocation here.
                d.flows.clear();
                d.flows.extend(ctx.ep.flows().take(d.flows.capacity()));
                d.channels.clear();
                for (owner, slot) in ctx.env.channels.iter_mut().enumerate() {
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
                d.arp.extend(ctx.arp.entries(now).take(room));
                let top = &mut d.half_open_sources;
                top.clear();
                for (ip, n) in ctx.ep.half_open_sources() {
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
