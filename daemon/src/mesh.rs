//! Hand-off between shards: a single-producer single-consumer ring for every ordered pair of
//! shards.
//!
//! A frame can land on a shard that does not own its flow: server flows (the SYN of a new
//! connection lands wherever the device's hash puts it, the listener lives with its channel's
//! shard) and devices without RSS (one queue, or a fixed queue per peer, receives everything).
//! The receiving shard looks the destination port up in the shared port space's owner table
//! ([`SharedPorts::owner`](crate::ports::SharedPorts::owner))
//! and passes the frame to its owner here. ARP answers are broadcast the same way, so that a
//! connect waiting on one shard learns an address another shard received.
//!
//! Rings are bounded; a full ring drops the frame (counted), as a full NIC queue would, and
//! the transport's retransmission recovers.

use machnet_net::time::Instant;
use machnet_net::wire::EthernetAddress;
use machnet_runtime::idle::Waker;
use std::net::Ipv4Addr;

/// Entries of each ring.
pub const RING_ENTRIES: usize = 1024;

/// What one shard hands another.
pub enum Handoff<B> {
    /// A received Machnet frame for a flow or listener of the receiving shard; checksums were
    /// verified by the sender (or the device).
    Frame {
        /// The frame.
        buf: B,
        /// When it arrived.
        rx_at: Instant,
    },
    /// An ARP mapping learnt from a request or reply for the local IP.
    Arp {
        /// Address.
        ip: Ipv4Addr,
        /// Its MAC.
        mac: EthernetAddress,
    },
    /// The sending shard is about to ask for `ip` with an ARP request (so that a reply landing
    /// on another shard counts as solicited there).
    ArpAsked {
        /// Address.
        ip: Ipv4Addr,
    },
}

/// One shard's ends of the mesh.
pub struct Mesh<B> {
    index: usize,
    /// To shard j (`None` at this shard's own index).
    out: Vec<Option<rtrb::Producer<Handoff<B>>>>,
    /// From each other shard.
    inb: Vec<rtrb::Consumer<Handoff<B>>>,
    /// Wakers of the other shards.
    wakers: Vec<Waker>,
    /// Shards that were handed something since the last [`wake`](Self::wake).
    to_wake: u64,
    /// The source [`receive`](Self::receive) starts at (rotates).
    next_source: usize,
    /// Frames and mappings handed out.
    pub sent: u64,
    /// Handed in.
    pub received: u64,
    /// Dropped because the target's ring was full.
    pub dropped: u64,
}

impl<B> Mesh<B> {
    /// The meshes of `wakers.len()` shards (`wakers[i]` wakes shard i), in shard order.
    pub fn build(wakers: &[Waker]) -> Vec<Mesh<B>> {
        let n = wakers.len();
        let mut meshes: Vec<Mesh<B>> = (0..n)
            .map(|i| Mesh {
                index: i,
                out: (0..n).map(|_| None).collect(),
                inb: Vec::with_capacity(n.saturating_sub(1)),
                wakers: wakers.to_vec(),
                to_wake: 0,
                next_source: 0,
                sent: 0,
                received: 0,
                dropped: 0,
            })
            .collect();
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    let (p, c) = rtrb::RingBuffer::new(RING_ENTRIES);
                    meshes[from].out[to] = Some(p);
                    meshes[to].inb.push(c);
                }
            }
        }
        meshes
    }

    /// Shards in the mesh.
    pub fn shards(&self) -> usize {
        self.out.len()
    }

    /// Hands `h` to shard `to`; gives it back if that ring is full.
    pub fn send(&mut self, to: usize, h: Handoff<B>) -> Result<(), Handoff<B>> {
        let Some(Some(p)) = self.out.get_mut(to) else { return Err(h) };
        match p.push(h) {
            Ok(()) => {
                self.sent += 1;
                self.to_wake |= 1 << (to % 64);
                Ok(())
            }
            Err(rtrb::PushError::Full(h)) => {
                self.dropped += 1;
                Err(h)
            }
        }
    }

    /// Sends an ARP mapping to every other shard.
    pub fn broadcast_arp(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        self.broadcast(Handoff::Arp { ip, mac });
    }

    /// Sends a message without a frame (`Arp`, `ArpAsked`) to every other shard; a frame is
    /// not sent.
    pub fn broadcast(&mut self, h: Handoff<B>) {
        let copy = |h: &Handoff<B>| match *h {
            Handoff::Arp { ip, mac } => Some(Handoff::Arp { ip, mac }),
            Handoff::ArpAsked { ip } => Some(Handoff::ArpAsked { ip }),
            Handoff::Frame { .. } => None,
        };
        for to in 0..self.out.len() {
            if to != self.index {
                if let Some(h) = copy(&h) {
                    let _ = self.send(to, h);
                }
            }
        }
    }

    /// Takes up to `budget` items handed to this shard.
    pub fn receive(&mut self, budget: usize, mut f: impl FnMut(Handoff<B>)) -> usize {
        let mut n = 0;
        // Start at a different source each call, so that a busy one cannot starve the rest.
        let k = self.inb.len();
        if k == 0 {
            return 0;
        }
        self.next_source = (self.next_source + 1) % k;
        let (tail, head) = self.inb.split_at_mut(self.next_source);
        for c in head.iter_mut().chain(tail.iter_mut()) {
            while n < budget {
                match c.pop() {
                    Ok(h) => {
                        n += 1;
                        f(h);
                    }
                    Err(_) => break,
                }
            }
        }
        self.received += n as u64;
        n
    }

    /// True if anything waits to be received.
    pub fn has_input(&self) -> bool {
        self.inb.iter().any(|c| !c.is_empty())
    }

    /// Wakes the shards handed something since the last call (if they are parked).
    pub fn wake(&mut self) {
        let mut m = self.to_wake;
        self.to_wake = 0;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            // Shards beyond 64 share bits: waking a few extra is harmless.
            for j in (i..self.wakers.len()).step_by(64) {
                if j != self.index {
                    self.wakers[j].wake();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use machnet_runtime::idle::Parker;

    #[test]
    fn frames_reach_the_named_shard_and_full_rings_give_them_back() {
        let parkers: Vec<Parker> = (0..3).map(|_| Parker::new().unwrap()).collect();
        let wakers: Vec<Waker> = parkers.iter().map(|p| p.waker()).collect();
        let mut m = Mesh::<u32>::build(&wakers);
        assert_eq!(m[0].shards(), 3);
        assert!(m[0].send(0, Handoff::Frame { buf: 1, rx_at: Instant::ZERO }).is_err(), "no ring to itself");
        m[0].send(2, Handoff::Frame { buf: 7, rx_at: Instant::ZERO }).map_err(|_| ()).unwrap();
        m[1].broadcast_arp(Ipv4Addr::new(198, 18, 0, 9), EthernetAddress([2, 0, 0, 0, 0, 9]));
        assert!(!m[1].has_input());
        assert!(m[2].has_input());
        let mut got = Vec::new();
        m[2].receive(64, |h| {
            got.push(match h {
                Handoff::Frame { buf, .. } => format!("frame {buf}"),
                Handoff::Arp { ip, .. } => format!("arp {ip}"),
                Handoff::ArpAsked { ip } => format!("asked {ip}"),
            })
        });
        got.sort();
        assert_eq!(got, ["arp 198.18.0.9", "frame 7"], "each once (no order across sources)");
        assert_eq!(m[0].receive(64, |_| {}), 1, "shard 0 got the ARP mapping too");
        // A parked shard is woken.
        parkers[2].prepare();
        m[0].send(2, Handoff::Frame { buf: 8, rx_at: Instant::ZERO }).map_err(|_| ()).unwrap();
        m[0].wake();
        assert!(parkers[2].park(std::time::Duration::from_secs(5)));
        // Full ring: the frame comes back, counted.
        let mut sent = 1;
        while m[0].send(1, Handoff::Frame { buf: sent, rx_at: Instant::ZERO }).is_ok() {
            sent += 1;
        }
        assert_eq!(sent as usize, RING_ENTRIES + 1);
        assert_eq!(m[0].dropped, 1);
    }

    #[test]
    fn a_busy_source_does_not_starve_the_others() {
        let parkers: Vec<Parker> = (0..3).map(|_| Parker::new().unwrap()).collect();
        let wakers: Vec<Waker> = parkers.iter().map(|p| p.waker()).collect();
        let mut m = Mesh::<u32>::build(&wakers);
        for k in 0..100 {
            m[0].send(2, Handoff::Frame { buf: k, rx_at: Instant::ZERO }).map_err(|_| ()).unwrap();
            m[1].send(2, Handoff::Frame { buf: 1000 + k, rx_at: Instant::ZERO }).map_err(|_| ()).unwrap();
        }
        // Two calls with a budget smaller than either backlog: both sources are served, each
        // in its own order.
        let mut got = Vec::new();
        for _ in 0..2 {
            m[2].receive(8, |h| {
                if let Handoff::Frame { buf, .. } = h {
                    got.push(buf)
                }
            });
        }
        let (from0, from1): (Vec<u32>, Vec<u32>) = got.iter().partition(|&&b| b < 1000);
        assert_eq!(from0, (0..8).collect::<Vec<_>>(), "{got:?}");
        assert_eq!(from1, (1000..1008).collect::<Vec<_>>(), "{got:?}");
    }
}
