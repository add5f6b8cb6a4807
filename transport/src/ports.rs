//! Local ports: the endpoint asks an injected [`PortAllocator`] for them.
//!
//! An [`Endpoint`](crate::Endpoint) takes a local port when it listens or opens a client flow,
//! and gives it back when the listener closes and its last accepted flow is gone, or when the
//! client flow is freed. It asks its allocator, a type parameter of the endpoint, so the
//! protocol holds no lock and no reference count: several shards sharing one local IP share
//! one allocator behind their own handles (machnetd keeps a locked bitmap and a lock-free
//! owner table, `daemon/src/ports.rs`); a single endpoint owns a plain [`LocalPorts`].
//!
//! The allocator is called only on the slow path (listen, unlisten, connect, flow teardown),
//! never per packet; being a generic parameter, the calls are static, never `dyn`.

use core::net::Ipv4Addr;
use machnet_net::rss::{search_source_port, PortBitmap, Rss};

/// Where an endpoint's local ports come from. Every method is called from the endpoint's
/// thread, on listen, unlisten, connect and flow teardown only.
///
/// `shard` is the endpoint's queue ([`Endpoint::set_steering`](crate::Endpoint::set_steering);
/// 0 unless set): an allocator shared by shards records it, so that a packet received by the
/// wrong shard can be handed to the owner of its destination port.
pub trait PortAllocator {
    /// Takes `port` (a listener's) for `shard`; false if it is taken.
    fn reserve(&mut self, port: u16, shard: u16) -> bool;
    /// Takes a client source port for `query.shard()`: normally the one
    /// [`ClientPortQuery::search`] finds among the free ports (the RSS-- search). `None` if
    /// none is left.
    fn reserve_client(&mut self, query: &ClientPortQuery<'_>) -> Option<u16>;
    /// Gives back `port`, taken by [`reserve`](Self::reserve) or
    /// [`reserve_client`](Self::reserve_client).
    fn release(&mut self, port: u16);
}

/// A client connect's request for a source port: the reply `remote → local:port` must be
/// steered by the device's RSS to `shard`'s queue (spec §5.3).
#[derive(Clone, Copy)]
pub struct ClientPortQuery<'a> {
    rss: Option<&'a Rss>,
    shard: u16,
    local_ip: Ipv4Addr,
    remote_ip: Ipv4Addr,
    remote_port: u16,
}

impl core::fmt::Debug for ClientPortQuery<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientPortQuery")
            .field("rss", &self.rss.is_some())
            .field("shard", &self.shard)
            .field("local_ip", &self.local_ip)
            .field("remote_ip", &self.remote_ip)
            .field("remote_port", &self.remote_port)
            .finish()
    }
}

impl<'a> ClientPortQuery<'a> {
    /// A query for a flow `local_ip:? → remote_ip:remote_port` owned by `shard`, whose replies
    /// the device steers with `rss` (`None`: one queue receives everything). The endpoint
    /// builds these; allocators' tests may too.
    pub fn new(rss: Option<&'a Rss>, shard: u16, local_ip: Ipv4Addr, remote_ip: Ipv4Addr, remote_port: u16) -> Self {
        ClientPortQuery { rss, shard, local_ip, remote_ip, remote_port }
    }
    /// The shard (queue) that will own the flow.
    pub fn shard(&self) -> u16 {
        self.shard
    }
    /// The remote end of the flow.
    pub fn remote(&self) -> (Ipv4Addr, u16) {
        (self.remote_ip, self.remote_port)
    }
    /// The lowest port of `used`'s free ones in [1024, 65535] that steers replies to the
    /// shard ([`search_source_port`]). The port is not taken.
    pub fn search(&self, used: &PortBitmap) -> Option<u16> {
        search_source_port(self.rss, self.shard, self.local_ip, self.remote_ip, self.remote_port, used).ok()
    }
}

/// The ports of one local IP used by one endpoint alone (one shard, an embedder without
/// threads): a plain bitmap, no lock.
#[derive(Debug, Clone, Default)]
pub struct LocalPorts {
    used: PortBitmap,
}

impl LocalPorts {
    /// All ports free.
    pub fn new() -> Self {
        Self::default()
    }
    /// True if `port` is taken.
    pub fn is_used(&self, port: u16) -> bool {
        self.used.is_used(port)
    }
    /// Ports taken.
    pub fn in_use(&self) -> usize {
        self.used.count_used()
    }
}

impl PortAllocator for LocalPorts {
    fn reserve(&mut self, port: u16, _shard: u16) -> bool {
        self.used.take(port)
    }
    fn reserve_client(&mut self, query: &ClientPortQuery<'_>) -> Option<u16> {
        let p = query.search(&self.used)?;
        self.used.take(p);
        Some(p)
    }
    fn release(&mut self, port: u16) {
        self.used.release(port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(shard: u16) -> ClientPortQuery<'static> {
        ClientPortQuery::new(None, shard, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 888)
    }

    #[test]
    fn local_ports_take_release_and_search() {
        let mut p = LocalPorts::new();
        assert!(p.reserve(1024, 0));
        assert!(!p.reserve(1024, 0), "a taken port cannot be taken again");
        assert_eq!(p.reserve_client(&query(0)), Some(1025), "the lowest free client port");
        assert_eq!(p.reserve_client(&query(0)), Some(1026));
        assert_eq!(p.in_use(), 3);
        p.release(1024);
        assert!(!p.is_used(1024));
        assert_eq!(p.reserve_client(&query(0)), Some(1024), "a released port is reused");
    }
}
