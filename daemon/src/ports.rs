//! The port space of one local IP, shared by the shards (endpoints) of a daemon.
//!
//! Two things per port: whether it is taken (a bitmap, locked only on listen, connect and flow
//! teardown, never per packet), and which shard owns it (a lock-free table read per received
//! packet, so that a packet landing on the wrong shard can be handed to its owner). Ports are
//! unique across shards, so the local port alone names the owner of every flow and listener.
//!
//! Each shard's endpoint holds a [`SharedPorts`] handle as its
//! [`PortAllocator`](machnet_transport::PortAllocator): the transport asks it for ports and
//! never sees the lock.

use machnet_net::rss::PortBitmap;
use machnet_transport::{ClientPortQuery, Endpoint, PortAllocator};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most shards the owner table can name.
pub const MAX_SHARDS: u16 = 255;

/// A shard's endpoint: its ports come from the daemon's shared space.
pub type ShardEndpoint = Endpoint<SharedPorts>;

/// Taken ports and their owning shards.
struct PortSpace {
    used: Mutex<PortBitmap>,
    /// Owner shard + 1 per port; 0 = none.
    owner: Box<[AtomicU8]>,
}

/// A handle on the port space of one local IP, shared by the shards; clones share it.
#[derive(Clone)]
pub struct SharedPorts(Arc<PortSpace>);

impl core::fmt::Debug for SharedPorts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SharedPorts({} in use)", self.in_use())
    }
}

impl Default for SharedPorts {
    fn default() -> Self {
        SharedPorts(Arc::new(PortSpace {
            used: Mutex::new(PortBitmap::new()),
            owner: (0..=u16::MAX).map(|_| AtomicU8::new(0)).collect(),
        }))
    }
}

impl SharedPorts {
    /// An empty space.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shard that owns `port` (a listener, a client flow, or flows still open on a closed
    /// listener's port), if any. One atomic load.
    #[inline]
    pub fn owner(&self, port: u16) -> Option<u16> {
        match self.0.owner[usize::from(port)].load(Ordering::Acquire) {
            0 => None,
            v => Some(u16::from(v) - 1),
        }
    }

    /// Ports taken.
    pub fn in_use(&self) -> usize {
        self.lock().count_used()
    }

    /// The bitmap, locked (a panicking holder cannot corrupt a bitmap: the poison is ignored).
    fn lock(&self) -> MutexGuard<'_, PortBitmap> {
        self.0.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_owner(&self, port: u16, shard: u16) {
        self.0.owner[usize::from(port)].store(shard.min(MAX_SHARDS - 1) as u8 + 1, Ordering::Release);
    }
}

impl PortAllocator for SharedPorts {
    fn reserve(&mut self, port: u16, shard: u16) -> bool {
        let mut bits = self.lock();
        if !bits.take(port) {
            return false;
        }
        self.set_owner(port, shard);
        true
    }

    fn reserve_client(&mut self, query: &ClientPortQuery<'_>) -> Option<u16> {
        // The search and the take happen under one lock: two shards cannot pick one port.
        let mut bits = self.lock();
        let p = query.search(&bits)?;
        bits.take(p);
        self.set_owner(p, query.shard());
        Some(p)
    }

    fn release(&mut self, port: u16) {
        let mut bits = self.lock();
        bits.release(port);
        self.0.owner[usize::from(port)].store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn owner_follows_take_and_release() {
        let s = SharedPorts::new();
        let (mut a, mut b) = (s.clone(), s.clone());
        assert_eq!(s.owner(888), None);
        assert!(a.reserve(888, 3));
        assert!(!b.reserve(888, 1), "a taken port cannot be taken again, by any shard");
        assert_eq!(s.owner(888), Some(3));
        assert_eq!(s.in_use(), 1);
        a.release(888);
        assert_eq!(s.owner(888), None);
        assert!(b.reserve(888, 0));
        assert_eq!(s.owner(888), Some(0));
        assert!(a.reserve(889, 300));
        assert_eq!(s.owner(889), Some(MAX_SHARDS - 1), "shards past the table's range share its last name");
    }

    #[test]
    fn shards_get_distinct_client_ports_and_endpoints_ask_the_space() {
        let s = SharedPorts::new();
        let (ip_l, ip_r) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let (mut shard0, mut shard1) = (s.clone(), s.clone());
        let q = |shard| ClientPortQuery::new(None, shard, ip_l, ip_r, 888);
        assert_eq!(shard1.reserve_client(&q(1)), Some(1024));
        assert_eq!(shard0.reserve_client(&q(0)), Some(1025), "the other shard's port is skipped");
        assert_eq!((s.owner(1024), s.owner(1025)), (Some(1), Some(0)));
        // An endpoint on the space takes and gives back its listener's port there, under its
        // queue's name.
        let local = machnet_transport::LocalAddr { mac: Default::default(), ip: ip_l };
        let mut ep: ShardEndpoint = Endpoint::new(machnet_transport::Config::default(), local, s.clone()).unwrap();
        ep.set_steering(None, 2);
        assert_eq!(ep.listen(7, 1024), Err(machnet_transport::Error::PortInUse));
        ep.listen(7, 80).unwrap();
        assert_eq!(s.owner(80), Some(2));
        ep.unlisten(7, 80).unwrap();
        assert_eq!(s.owner(80), None);
        assert_eq!(s.in_use(), 2);
    }
}
