//! The `rx` stage: what other shards handed in, then a burst from the port queue (ARP and ICMP
//! echo answered here, Machnet frames to the endpoint or handed to the shard that owns their
//! port).

use super::context::ShardCtx;
use crate::arp::Learned;
use crate::capture::Dir;
use crate::mesh::Handoff;
use crate::nic::{handle_frame, Rx};
use arrayvec::ArrayVec;
use machnet_net::port::{Burst, PacketBuf, Port, BURST};
use machnet_net::time::Instant;
use machnet_net::wire::{ChecksumCaps, EthernetAddress};
use machnet_runtime::stage::{Stage, Work};
use std::net::Ipv4Addr;

/// The receive burst and how received checksums are checked.
pub(super) struct RxStage<P: Port> {
    /// The receive burst, boxed so that taking it out for a loop moves a pointer, not 32
    /// buffers (`None` only while the loop runs).
    pub(super) burst: Option<Box<Burst<P::Buf>>>,
    /// Receive checksum handling (transmit comes from the port's capabilities).
    pub(super) caps: ChecksumCaps,
}

impl<P: Port> Stage<ShardCtx<P>> for RxStage<P> {
    fn poll(&mut self, now: Instant, ctx: &mut ShardCtx<P>) -> Work {
        let mut n = 0;
        // What other shards handed in first: an `ArpAsked` must be seen before the reply it
        // announces, which the asking shard sent after it (see crate::arp).
        if ctx.mesh.shards() > 1 {
            let mut frames: ArrayVec<(P::Buf, Instant), BURST> = ArrayVec::new();
            let mut arps: ArrayVec<(Ipv4Addr, EthernetAddress), BURST> = ArrayVec::new();
            let arp = &mut ctx.arp;
            n += ctx.mesh.receive(BURST, |h| match h {
                Handoff::Frame { buf, rx_at } => frames.push((buf, rx_at)),
                Handoff::Arp { ip, mac } => arps.push((ip, mac)),
                Handoff::ArpAsked { ip } => arp.note_asked(ip, now),
            });
            ctx.env.counters.handoff_frames_received += frames.len() as u64;
            for (buf, rx_at) in frames {
                ctx.on_frame(now, buf, rx_at, true, self.caps);
            }
            for (ip, mac) in arps {
                // Another shard's reply: it counts here only if this shard asked too.
                let learned = ctx.arp.on_reply(ip, mac, now);
                if learned != Learned::Ignored {
                    ctx.on_learned(now, ip, mac, learned);
                }
            }
        }
        ctx.env.nic.port.set_time(now);
        let mut rx = self.burst.take().expect("the receive burst is put back after every loop");
        n += ctx.env.nic.port.rx_burst(&mut rx);
        if let Some(t) = ctx.env.nic.tap.as_deref_mut() {
            t.now = now;
            for b in rx.iter() {
                t.frame(Dir::In, b.rx_timestamp().unwrap_or(now), b.frame());
            }
        }
        for b in rx.drain(..) {
            // The kernel's receive time, where the port knows it, keeps the time this frame
            // waited for the shard out of round-trip samples.
            let rx_at = b.rx_timestamp().unwrap_or(now);
            ctx.on_frame(now, b, rx_at, false, self.caps);
        }
        self.burst = Some(rx);
        if n > 0 {
            // Handling the burst took time: what it let go leaves now.
            let now = ctx.fresh_now();
            ctx.ep.flush(now, &mut ctx.env);
        }
        ctx.mesh.wake();
        Work(n as u32)
    }
}

impl<P: Port> ShardCtx<P> {
    /// One received frame: `handed` frames come from another shard, which verified them and
    /// found this shard the owner of their destination port.
    fn on_frame(&mut self, now: Instant, b: P::Buf, rx_at: Instant, handed: bool, rx_caps: ChecksumCaps) {
        let caps = if handed || b.rx_checksum_good() { rx_caps.without_rx() } else { rx_caps };
        let mut forward_to = None;
        match handle_frame(&mut self.env.nic, &mut self.arp, self.local, b.frame(), caps, now) {
            Rx::Machnet(m) => match self.ep.ports().owner(m.dst_port) {
                Some(o) if !handed && usize::from(o) != self.index && self.mesh.shards() > 1 => {
                    forward_to = Some(usize::from(o));
                }
                _ => self.ep.handle_at(now, rx_at, &mut self.env, &m),
            },
            Rx::Arp { ip, mac, learned, replied } => {
                self.env.counters.arp_replies += u64::from(replied);
                if let Some(learned) = learned {
                    if self.mesh.shards() > 1 {
                        // A resolution waiting for this reply may be another shard's.
                        self.mesh.broadcast_arp(ip, mac);
                    }
                    self.on_learned(now, ip, mac, learned);
                }
            }
            Rx::Icmp(replied) => self.env.counters.icmp_replies += u64::from(replied),
            Rx::Dropped => self.env.counters.rx_dropped += 1,
        }
        match forward_to {
            Some(to) => match self.mesh.send(to, Handoff::Frame { buf: b, rx_at }) {
                Ok(()) => self.env.counters.handoff_frames_sent += 1,
                Err(Handoff::Frame { buf, .. }) => self.env.nic.port.free(buf),
                Err(Handoff::Arp { .. } | Handoff::ArpAsked { .. }) => {}
            },
            None => self.env.nic.port.free(b),
        }
    }

    /// An ARP reply did `learned` to the table.
    pub(super) fn on_learned(&mut self, now: Instant, ip: Ipv4Addr, mac: EthernetAddress, learned: Learned) {
        match learned {
            Learned::Ignored => self.env.counters.arp_ignored += 1,
            Learned::Resolved => self.run_pending(now, ip, Some(mac)),
            Learned::Changed => {
                self.env.counters.arp_changed += 1;
                let n = self.ep.update_peer_mac(now, &mut self.env, ip, mac);
                log::info!("shard {}: {ip} moved to {mac}; {n} connects in progress follow it", self.index);
                self.run_pending(now, ip, Some(mac));
            }
        }
    }
}
