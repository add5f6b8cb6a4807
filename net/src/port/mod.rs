//! Packet ports: burst receive and transmit of pooled packet buffers.
//!
//! A [`Port`] is one receive/transmit queue pair of a device, owned by one shard. Buffers come
//! from a pool preallocated when the port is created; in steady state nothing allocates.
//!
//! Ownership: [`Port::alloc`] hands out a buffer; passing it to [`Port::tx_burst`] gives it to
//! the device (buffers the device accepted are removed from the burst, the rest stay with the
//! caller); [`Port::rx_burst`] hands received buffers to the caller, who returns them with
//! [`Port::free`] (or transmits them).
//!
//! Backends:
//! * [`mem`]: a connected pair of in-process ports, for tests and embedding, with an optional
//!   seeded [`fault`] injector (loss, duplication, reordering, delay, corruption, rate limit);
//! * [`udp`]: whole Ethernet frames tunnelled one per kernel UDP datagram; zero setup, no
//!   privileges;
//! * [`dpdk`]: DPDK ethdev queues (kernel bypass), behind this crate's `dpdk` feature.
//!
//! Without the `std` feature only the trait, [`HeapBuf`], [`Pool`] and the [`fault`] injector
//! are here: an embedder on a `no_std` target brings its own [`Port`] (the `mem`, `udp` and
//! `dpdk` backends need threads, locks or the OS).

use crate::rss::Rss;
use crate::wire::{ChecksumCaps, EthernetAddress};
use alloc::vec::Vec;
use arrayvec::ArrayVec;

#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod fault;
#[cfg(feature = "std")]
pub mod mem;
mod pool;
#[cfg(feature = "std")]
pub mod udp;

pub use pool::{HeapBuf, Pool};

/// Largest number of packets moved by one burst call.
pub const BURST: usize = 32;

/// A burst of packet buffers.
pub type Burst<B> = ArrayVec<B, BURST>;

/// A packet buffer from a port's pool.
pub trait PacketBuf {
    /// The frame: the first `len` bytes.
    fn frame(&self) -> &[u8];
    /// The frame, mutable.
    fn frame_mut(&mut self) -> &mut [u8];
    /// The whole writable area (capacity bytes); write a frame here, then [`set_len`](Self::set_len).
    fn storage_mut(&mut self) -> &mut [u8];
    /// Largest frame the buffer holds.
    fn capacity(&self) -> usize;
    /// Sets the frame length (clamped to the capacity).
    fn set_len(&mut self, len: usize);
    /// Frame length.
    fn len(&self) -> usize {
        self.frame().len()
    }
    /// True when the frame is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True if the device verified this received frame's IPv4 and L4 checksums as good, so
    /// software need not check them again.
    fn rx_checksum_good(&self) -> bool {
        false
    }
    /// When the frame arrived, if the backend knows better than "when it was polled" (the
    /// kernel's receive time on the UDP backend). On the `CLOCK_MONOTONIC` time base.
    fn rx_timestamp(&self) -> Option<crate::time::Instant> {
        None
    }
}

/// What a port offers. Missing offloads are handled in software, never fatal.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// The port's MAC address.
    pub mac: EthernetAddress,
    /// IP MTU (1500 for Ethernet).
    pub mtu: usize,
    /// Number of receive/transmit queue pairs of the device.
    pub queues: u16,
    /// RSS key and RETA read back from the device, if it hashes to several queues.
    pub rss: Option<RssInfo>,
    /// Which checksums software must handle on this port.
    pub checksum: ChecksumCaps,
}

/// A device's RSS configuration as read back from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RssInfo {
    /// Toeplitz key.
    pub key: Vec<u8>,
    /// Redirection table (entry → queue).
    pub reta: Vec<u16>,
}

impl RssInfo {
    /// Builds the hashing state; `None` if the device's key or RETA is unusable.
    pub fn build(&self) -> Option<Rss> {
        Rss::new(&self.key, &self.reta).ok()
    }
}

/// Counters every port keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received and handed to the caller.
    pub rx_packets: u64,
    /// Bytes in those frames.
    pub rx_bytes: u64,
    /// Frames accepted for transmission.
    pub tx_packets: u64,
    /// Bytes in those frames.
    pub tx_bytes: u64,
    /// Received frames dropped by the port (bad size, unknown sender, no buffer).
    pub rx_dropped: u64,
    /// Frames the device refused (queue full); they stayed with the caller.
    pub tx_busy: u64,
    /// Allocation requests the pool could not satisfy.
    pub alloc_failures: u64,
}

/// One receive/transmit queue pair of a device.
pub trait Port {
    /// The buffer type of this port's pool.
    type Buf: PacketBuf;

    /// What the port offers.
    fn capabilities(&self) -> &Capabilities;
    /// A free buffer (frame length 0), or `None` if the pool is exhausted.
    fn alloc(&mut self) -> Option<Self::Buf>;
    /// Returns a buffer to the pool.
    fn free(&mut self, buf: Self::Buf);
    /// Receives up to `out`'s remaining capacity, appending; returns how many arrived.
    fn rx_burst(&mut self, out: &mut Burst<Self::Buf>) -> usize;
    /// Transmits from the front of `pkts`; sent buffers are removed (the device owns them),
    /// unsent ones stay. Returns how many were sent.
    fn tx_burst(&mut self, pkts: &mut Burst<Self::Buf>) -> usize;
    /// Counters.
    fn stats(&self) -> PortStats;
    /// Tells a port that keeps time (a fault injector's delay line) what time it is; called
    /// by the poller every turn. Others ignore it.
    fn set_time(&mut self, _now: crate::time::Instant) {}
    /// When a port that keeps time next needs [`set_time`](Self::set_time) even without
    /// traffic (a delayed frame is due).
    fn next_event(&self) -> Option<crate::time::Instant> {
        None
    }
    /// What a fault injector wrapping this port did, if one does.
    fn fault_stats(&self) -> Option<fault::FaultStats> {
        None
    }
}
