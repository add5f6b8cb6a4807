//! A connected pair of in-process ports.
//!
//! Each direction is a bounded queue of buffers; a frame sent on one port is received, as the
//! same buffer, on the other. Each port keeps a local free list and exchanges batches with a
//! shared spare list, so locks are taken per burst rather than per packet and one-way traffic
//! cannot starve the sender's pool. The ports are `Send`: the two ends may live on two threads.
//!
//! [`pairs`] makes several links that share one set of buffers, like the queues of a
//! multi-queue NIC sharing its mempool: a frame received on one and freed on another (handed
//! between shards) goes back to the common buffers.

use super::pool::{shared_spare, CachedPool, HeapBuf, SharedSpare};
use super::{Burst, Capabilities, PacketBuf, Port, PortStats};
use crate::wire::{ChecksumCaps, EthernetAddress};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Sizes of a [`pair`].
#[derive(Debug, Clone, Copy)]
pub struct MemConfig {
    /// Buffers per port at creation.
    pub buffers: usize,
    /// Bytes per buffer (largest frame).
    pub buf_size: usize,
    /// Frames each direction holds before `tx_burst` refuses more.
    pub queue_len: usize,
    /// IP MTU reported in the capabilities.
    pub mtu: usize,
    /// Checksum handling reported in the capabilities (software by default).
    pub checksum: ChecksumCaps,
}

impl Default for MemConfig {
    fn default() -> Self {
        MemConfig { buffers: 4096, buf_size: 2048, queue_len: 2048, mtu: 1500, checksum: ChecksumCaps::software() }
    }
}

struct Shared {
    /// `links[i]`: frames sent by port `i`, waiting for the other port.
    links: [Mutex<VecDeque<HeapBuf>>; 2],
    queue_len: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on the other end must not cascade: the data is plain buffers.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end of an in-process link.
pub struct MemPort {
    id: usize,
    shared: Arc<Shared>,
    pool: CachedPool,
    caps: Capabilities,
    stats: PortStats,
}

impl std::fmt::Debug for MemPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemPort").field("id", &self.id).field("mac", &self.caps.mac).finish_non_exhaustive()
    }
}

/// Creates two connected ports with the given MACs.
pub fn pair(cfg: MemConfig, mac_a: EthernetAddress, mac_b: EthernetAddress) -> (MemPort, MemPort) {
    let (mut a, mut b) = pairs(1, cfg, mac_a, mac_b);
    (a.remove(0), b.remove(0))
}

/// Creates `n` connected pairs (`a[i]` talks to `b[i]`) whose `2 * n * cfg.buffers` buffers
/// are one common set, as the queues of two multi-queue NICs would share their mempools.
pub fn pairs(n: usize, cfg: MemConfig, mac_a: EthernetAddress, mac_b: EthernetAddress) -> (Vec<MemPort>, Vec<MemPort>) {
    let total = 2 * n * cfg.buffers;
    let spare: SharedSpare = shared_spare(cfg.buf_size, total);
    let make = |id: usize, mac: EthernetAddress, shared: &Arc<Shared>| MemPort {
        id,
        shared: Arc::clone(shared),
        pool: CachedPool::new(Arc::clone(&spare), cfg.buffers, cfg.buf_size, total),
        caps: Capabilities { mac, mtu: cfg.mtu, queues: 1, rss: None, checksum: cfg.checksum },
        stats: PortStats::default(),
    };
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let shared = Arc::new(Shared {
            links: [
                Mutex::new(VecDeque::with_capacity(cfg.queue_len)),
                Mutex::new(VecDeque::with_capacity(cfg.queue_len)),
            ],
            queue_len: cfg.queue_len,
        });
        a.push(make(0, mac_a, &shared));
        b.push(make(1, mac_b, &shared));
    }
    (a, b)
}

impl MemPort {
    /// Frames queued towards this port and not yet received.
    pub fn pending_rx(&self) -> usize {
        lock(&self.shared.links[1 - self.id]).len()
    }
    /// Buffers in this port's local free list.
    pub fn pool_available(&self) -> usize {
        self.pool.available()
    }
}

impl Port for MemPort {
    type Buf = HeapBuf;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    #[inline]
    fn alloc(&mut self) -> Option<HeapBuf> {
        let b = self.pool.get();
        if b.is_none() {
            self.stats.alloc_failures += 1;
        }
        b
    }

    #[inline]
    fn free(&mut self, buf: HeapBuf) {
        self.pool.put(buf);
    }

    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        let room = out.remaining_capacity();
        if room == 0 {
            return 0;
        }
        let mut link = lock(&self.shared.links[1 - self.id]);
        let n = room.min(link.len());
        for b in link.drain(..n) {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += b.len() as u64;
            out.push(b);
        }
        n
    }

    fn tx_burst(&mut self, pkts: &mut Burst<HeapBuf>) -> usize {
        let mut link = lock(&self.shared.links[self.id]);
        let n = pkts.len().min(self.shared.queue_len.saturating_sub(link.len()));
        for b in pkts.drain(..n) {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += b.len() as u64;
            link.push_back(b);
        }
        self.stats.tx_busy += (pkts.len()) as u64;
        n
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::BURST;

    fn frame(port: &mut MemPort, byte: u8, len: usize) -> HeapBuf {
        let mut b = port.alloc().unwrap();
        b.storage_mut()[..len].fill(byte);
        b.set_len(len);
        b
    }

    #[test]
    fn frames_cross_in_order_and_queue_is_bounded() {
        let cfg = MemConfig { buffers: 64, queue_len: 8, ..MemConfig::default() };
        let (mut a, mut b) = pair(cfg, EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2]));
        let mut burst = Burst::new();
        for i in 0..10u8 {
            burst.push(frame(&mut a, i, 60 + usize::from(i)));
        }
        assert_eq!(a.tx_burst(&mut burst), 8);
        assert_eq!(burst.len(), 2, "unsent frames stay with the caller");
        assert_eq!(a.stats().tx_busy, 2);
        let mut rx = Burst::new();
        assert_eq!(b.rx_burst(&mut rx), 8);
        for (i, f) in rx.iter().enumerate() {
            assert_eq!(f.len(), 60 + i);
            assert!(f.frame().iter().all(|&x| x == i as u8));
        }
        for f in rx.drain(..) {
            b.free(f);
        }
        assert_eq!(a.tx_burst(&mut burst), 2);
        assert_eq!(b.rx_burst(&mut rx), 2);
        assert_eq!(rx[0].frame()[0], 8);
    }

    #[test]
    fn one_way_traffic_does_not_starve_sender() {
        let cfg = MemConfig { buffers: 64, queue_len: 64, ..MemConfig::default() };
        let (mut a, mut b) = pair(cfg, EthernetAddress::ZERO, EthernetAddress::ZERO);
        for round in 0..100 {
            let mut burst = Burst::new();
            for _ in 0..BURST {
                burst.push(a.alloc().unwrap_or_else(|| panic!("sender starved in round {round}")));
            }
            assert_eq!(a.tx_burst(&mut burst), BURST);
            let mut rx = Burst::new();
            b.rx_burst(&mut rx);
            for f in rx.drain(..) {
                b.free(f);
            }
        }
    }

    #[test]
    fn buffers_freed_on_another_queue_are_not_lost() {
        // Shard-to-shard hand-off: frames sent by a[0] arrive at b[0] and are freed by b[1];
        // a[0] keeps
        // sending for many times its share of the buffers, and none are dropped.
        let cfg = MemConfig { buffers: 64, queue_len: 64, ..MemConfig::default() };
        let (mut a, mut b) = pairs(2, cfg, EthernetAddress::ZERO, EthernetAddress::ZERO);
        for round in 0..1000 {
            let mut burst = Burst::new();
            for _ in 0..BURST {
                burst.push(a[0].alloc().unwrap_or_else(|| panic!("a[0] starved in round {round}")));
            }
            assert_eq!(a[0].tx_burst(&mut burst), BURST);
            let mut rx = Burst::new();
            b[0].rx_burst(&mut rx);
            for f in rx.drain(..) {
                b[1].free(f);
            }
        }
        let local: usize = a.iter().chain(b.iter()).map(MemPort::pool_available).sum();
        assert_eq!(local + a[0].pool.spare_available(), 4 * 64, "every buffer is in some list");
    }

    #[test]
    fn ends_work_from_two_threads() {
        let (mut a, mut b) = pair(MemConfig::default(), EthernetAddress::ZERO, EthernetAddress::ZERO);
        // Both ends give up after a minute (a dead receiver must not leave the sender spinning).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let t = std::thread::spawn(move || {
            let mut got = 0u32;
            let mut rx = Burst::new();
            while got < 10_000 {
                assert!(std::time::Instant::now() < deadline, "receiver: {got} of 10000 frames in a minute");
                b.rx_burst(&mut rx);
                for f in rx.drain(..) {
                    assert_eq!(u32::from_le_bytes(f.frame()[..4].try_into().unwrap()), got);
                    got += 1;
                    b.free(f);
                }
                std::thread::yield_now();
            }
        });
        let mut next = 0u32;
        while next < 10_000 {
            let mut burst = Burst::new();
            while next < 10_000 && !burst.is_full() {
                match a.alloc() {
                    Some(mut f) => {
                        f.storage_mut()[..4].copy_from_slice(&next.to_le_bytes());
                        f.set_len(64);
                        burst.push(f);
                        next += 1;
                    }
                    None => break,
                }
            }
            while !burst.is_empty() {
                assert!(std::time::Instant::now() < deadline, "sender: queue full for a minute at {next} of 10000");
                a.tx_burst(&mut burst);
                std::thread::yield_now();
            }
        }
        t.join().unwrap();
    }
}
