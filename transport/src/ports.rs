//! The port space of one local IP, shared by the shards (endpoints) of a daemon.
//!
//! Two things per port: whether it is taken (a bitmap, locked only on listen, connect and flow
//! teardown, never per packet), and which shard owns it (a lock-free table read per received
//! packet, so that a packet landing on the wrong shard can be handed to its owner). Ports are
//! unique across shards, so the local port alone names the owner of every flow and listener.

use machnet_net::rss::PortBitmap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most shards the owner table can name.
pub const MAX_SHARDS: u16 = 255;

/// Taken ports and their owning shards.
pub struct PortSpace {
    used: Mutex<PortBitmap>,
    /// Owner shard + 1 per port; 0 = none.
    owner: Box<[AtomicU8]>,
}

impl core::fmt::Debug for PortSpace {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PortSpace({} in use)", self.in_use())
    }
}

impl Default for PortSpace {
    fn default() -> Self {
        PortSpace { used: Mutex::new(PortBitmap::new()), owner: (0..=u16::MAX).map(|_| AtomicU8::new(0)).collect() }
    }
}

impl PortSpace {
    /// An empty space, shared.
    pub fn shared() -> Arc<PortSpace> {
        Arc::new(PortSpace::default())
    }

    /// The shard that owns `port` (a listener, a client flow, or flows still open on a closed
    /// listener's port), if any. One atomic load.
    #[inline]
    pub fn owner(&self, port: u16) -> Option<u16> {
        match self.owner[usize::from(port)].load(Ordering::Acquire) {
            0 => None,
            v => Some(u16::from(v) - 1),
        }
    }

    /// Ports taken.
    pub fn in_use(&self) -> usize {
        self.lock().count_used()
    }

    /// The bitmap, locked (a panicking holder cannot corrupt a bitmap: the poison is ignored).
    pub(crate) fn lock(&self) -> PortsGuard<'_> {
        PortsGuard { bits: self.used.lock().unwrap_or_else(|e| e.into_inner()), owner: &self.owner }
    }
}

/// The locked port space: changes to the bitmap and the owner table happen together.
pub(crate) struct PortsGuard<'a> {
    bits: MutexGuard<'a, PortBitmap>,
    owner: &'a [AtomicU8],
}

impl PortsGuard<'_> {
    /// The bitmap.
    pub fn bits(&self) -> &PortBitmap {
        &self.bits
    }

    /// Takes `port` for `shard`; false if it was taken.
    pub fn take(&mut self, port: u16, shard: u16) -> bool {
        if !self.bits.take(port) {
            return false;
        }
        self.owner[usize::from(port)].store(shard.min(MAX_SHARDS - 1) as u8 + 1, Ordering::Release);
        true
    }

    /// Releases `port`.
    pub fn release(&mut self, port: u16) {
        self.bits.release(port);
        self.owner[usize::from(port)].store(0, Ordering::Release);
    }

    /// Ports taken.
    pub fn count_used(&self) -> usize {
        self.bits.count_used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_follows_take_and_release() {
        let s = PortSpace::shared();
        assert_eq!(s.owner(888), None);
        assert!(s.lock().take(888, 3));
        assert!(!s.lock().take(888, 1), "a taken port cannot be taken again");
        assert_eq!(s.owner(888), Some(3));
        assert_eq!(s.in_use(), 1);
        s.lock().release(888);
        assert_eq!(s.owner(888), None);
        assert!(s.lock().take(888, 0));
        assert_eq!(s.owner(888), Some(0));
    }
}
