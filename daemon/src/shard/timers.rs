//! The `timers` stage: the flows' timing wheel (retransmission, handshakes, tail probes), ARP
//! retries and failures, and re-resolution of peers whose SYNs go unanswered.

use super::context::ShardCtx;
use crate::arp::Learned;
use arrayvec::ArrayVec;
use machnet_net::port::Port;
use machnet_net::time::Instant;
use machnet_net::wire::EthernetAddress;
use machnet_runtime::stage::{Stage, Work};
use std::net::Ipv4Addr;

/// Lists for the ARP table's retries and failures (reserved at start-up for every resolution
/// the table can hold).
pub(super) struct TimersStage {
    pub(super) arp_send: Vec<Ipv4Addr>,
    pub(super) arp_failed: Vec<Ipv4Addr>,
}

impl<P: Port> Stage<ShardCtx<P>> for TimersStage {
    fn poll(&mut self, now: Instant, ctx: &mut ShardCtx<P>) -> Work {
        let mut n = 0;
        if ctx.env.timers.may_expire(now) {
            let fired = ctx.env.timers.expire(now);
            n = fired.len() as u32;
            for &f in &fired {
                ctx.ep.on_timer(now, &mut ctx.env, f);
            }
            ctx.env.timers.done(fired);
        }
        if ctx.ep.has_unanswered() {
            // (Collected first: the endpoint is borrowed while draining.)
            let unanswered: ArrayVec<Ipv4Addr, 64> = ctx.ep.take_unanswered().collect();
            for ip in unanswered {
                if ctx.arp.revalidate(ip, now) {
                    ctx.env.counters.arp_revalidations += 1;
                    ctx.send_arp_request(ip);
                }
            }
        }
        if ctx.arp.next_deadline().is_some_and(|d| d <= now) {
            n += 1;
            // Both lists have room for every resolution the table can hold.
            let (mut send, mut failed) = (core::mem::take(&mut self.arp_send), core::mem::take(&mut self.arp_failed));
            let mut learned: ArrayVec<(Ipv4Addr, EthernetAddress, Learned), 16> = ArrayVec::new();
            ctx.arp.poll(now, |ip| send.push(ip), |ip| failed.push(ip), |ip, mac, l| learned.push((ip, mac, l)));
            for (ip, mac, l) in learned {
                // A suspect's answer, the only one a resolution got.
                ctx.on_learned(now, ip, mac, l);
            }
            for ip in send.drain(..) {
                ctx.send_arp_request(ip);
            }
            for ip in failed.drain(..) {
                ctx.run_pending(now, ip, None);
            }
            (self.arp_send, self.arp_failed) = (send, failed);
        }
        if n > 0 {
            ctx.ep.flush(now, &mut ctx.env);
        }
        Work(n)
    }
}
