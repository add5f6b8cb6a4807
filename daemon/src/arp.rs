//! The ARP table of one shard: static entries, learned entries that age out, and resolutions
//! in progress with retries. Sans-IO: the shard sends the requests this table asks for.
//!
//! ARP has no authentication, so the table believes as little as it can (stricter than Linux
//! with `arp_accept=0`, which still lets any reply refresh an entry it has):
//!
//! * only a reply to a request of ours, while that resolution is in progress, creates or
//!   changes an entry ([`ArpTable::on_reply`]); unsolicited replies, gratuitous ARP and the
//!   sender fields of requests change nothing;
//! * static entries from the configuration never change and are never re-resolved;
//! * an entry whose peer leaves our SYNs unanswered is re-resolved
//!   ([`ArpTable::revalidate`]) while still in use: a peer that restarted with a new MAC is
//!   reachable again within a SYN timeout and an ARP round trip, and a forged entry (an
//!   attacker who answered a request faster than the peer) is corrected the same way.
//!
//! What remains: an attacker who answers each of our requests faster than the peer wins each
//! time. Static entries are the defence against that.

use hashbrown::HashMap;
use machnet_net::time::Instant;
use machnet_net::wire::EthernetAddress;
use std::net::Ipv4Addr;
use std::time::Duration;

/// ARP behaviour.
#[derive(Debug, Clone, Copy)]
pub struct ArpConfig {
    /// Lifetime of a learned entry.
    pub timeout: Duration,
    /// Requests sent before a resolution fails.
    pub retries: u32,
    /// Wait after the first request; it doubles after each further one, up to 1 s. With the
    /// defaults requests go out at 0, 50, 150, 350, 750 and 1550 ms and a resolution fails at
    /// 2.55 s: a neighbour whose daemon is busy or was not scheduled for a while (a loaded
    /// host) still answers in time; one that is not there fails in about the time a SYN
    /// nobody answers takes.
    pub retry: Duration,
    /// Most entries (learned + static + pending).
    pub capacity: usize,
}

impl Default for ArpConfig {
    fn default() -> Self {
        ArpConfig { timeout: Duration::from_secs(300), retries: 6, retry: Duration::from_millis(50), capacity: 4096 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: EthernetAddress,
    /// `None` for static entries.
    expires: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    sent: u32,
    next: Instant,
    /// The current wait between requests (doubling).
    interval: Duration,
}

/// Longest wait between two requests of one resolution.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What a reply did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Nothing: no resolution of ours was waiting for it (or it named a static entry).
    Ignored,
    /// A resolution completed: the entry is new or confirmed.
    Resolved,
    /// A resolution completed with a MAC other than the entry's: the peer moved.
    Changed,
}

/// What [`ArpTable::resolve`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Known.
    Known(EthernetAddress),
    /// Unknown; send a request now (the first of a resolution).
    SendRequest,
    /// A resolution is already under way.
    InProgress,
    /// The table is full.
    Full,
}

/// One shard's view of the neighbourhood.
#[derive(Debug)]
pub struct ArpTable {
    cfg: ArpConfig,
    entries: HashMap<Ipv4Addr, Entry>,
    pending: HashMap<Ipv4Addr, Pending>,
}

impl ArpTable {
    /// An empty table with room for `cfg.capacity` entries.
    pub fn new(cfg: ArpConfig) -> Self {
        ArpTable { cfg, entries: HashMap::with_capacity(cfg.capacity), pending: HashMap::with_capacity(cfg.capacity) }
    }

    /// Adds a permanent entry.
    pub fn add_static(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        self.entries.insert(ip, Entry { mac, expires: None });
        self.pending.remove(&ip);
    }

    /// The MAC of `ip` if known and fresh.
    pub fn lookup(&self, ip: Ipv4Addr, now: Instant) -> Option<EthernetAddress> {
        let e = self.entries.get(&ip)?;
        match e.expires {
            Some(t) if t <= now => None,
            _ => Some(e.mac),
        }
    }

    /// An ARP reply says `ip` is at `mac`. Believed only while a resolution of ours for `ip`
    /// is in progress (see the module docs); then it completes the resolution and creates or
    /// refreshes the entry.
    pub fn on_reply(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) -> Learned {
        if !mac.is_unicast() || ip.is_unspecified() || self.pending.remove(&ip).is_none() {
            return Learned::Ignored;
        }
        let fresh = Entry { mac, expires: Some(now + self.cfg.timeout) };
        match self.entries.get_mut(&ip) {
            // (A static entry is never resolved: no request of ours asked.)
            Some(e) if e.expires.is_none() => Learned::Ignored,
            Some(e) => {
                let changed = e.mac != mac && e.expires.is_some_and(|t| t > now);
                *e = fresh;
                if changed {
                    Learned::Changed
                } else {
                    Learned::Resolved
                }
            }
            None => {
                if self.entries.len() >= self.cfg.capacity {
                    // Full: make room by dropping what has aged out (ageing is otherwise lazy).
                    self.entries.retain(|_, e| e.expires.is_none_or(|t| t > now));
                }
                if self.entries.len() < self.cfg.capacity {
                    self.entries.insert(ip, fresh);
                }
                Learned::Resolved
            }
        }
    }

    /// Our SYNs to `ip` went unanswered: resolve it again while its entry stays in use. True if
    /// a request should go out now (a learned entry, no resolution already in progress).
    pub fn revalidate(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        let learned = self.entries.get(&ip).is_some_and(|e| e.expires.is_some());
        if !learned || self.pending.contains_key(&ip) || self.pending.len() >= self.cfg.capacity {
            return false;
        }
        self.pending.insert(ip, Pending { sent: 1, next: now + self.cfg.retry, interval: self.cfg.retry });
        true
    }

    /// Looks `ip` up, starting a resolution if needed.
    pub fn resolve(&mut self, ip: Ipv4Addr, now: Instant) -> Resolve {
        if let Some(mac) = self.lookup(ip, now) {
            return Resolve::Known(mac);
        }
        if self.pending.contains_key(&ip) {
            return Resolve::InProgress;
        }
        if self.pending.len() >= self.cfg.capacity {
            return Resolve::Full;
        }
        self.pending.insert(ip, Pending { sent: 1, next: now + self.cfg.retry, interval: self.cfg.retry });
        Resolve::SendRequest
    }

    /// Drives resolutions: `send(ip)` for each request due, `failed(ip)` for each that ran out
    /// of retries; drops expired entries. Call when [`next_deadline`](Self::next_deadline)
    /// passes.
    pub fn poll(&mut self, now: Instant, mut send: impl FnMut(Ipv4Addr), mut failed: impl FnMut(Ipv4Addr)) {
        let retries = self.cfg.retries;
        let entries = &mut self.entries;
        self.pending.retain(|ip, p| {
            if p.next > now {
                return true;
            }
            if p.sent >= retries {
                failed(*ip);
                // A re-resolution nobody answered: the entry is not trusted any more.
                if entries.get(ip).is_some_and(|e| e.expires.is_some()) {
                    entries.remove(ip);
                }
                return false;
            }
            p.sent += 1;
            p.interval = (p.interval * 2).min(MAX_RETRY_INTERVAL).max(p.interval);
            p.next = now + p.interval;
            send(*ip);
            true
        });
        self.entries.retain(|_, e| e.expires.is_none_or(|t| t > now));
    }

    /// When [`poll`](Self::poll) next has something to do (retries; ageing is lazy).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next).min()
    }

    /// All fresh entries (for statistics).
    pub fn entries(&self, now: Instant) -> impl Iterator<Item = (Ipv4Addr, EthernetAddress, bool)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| e.expires.is_none_or(|t| t > now))
            .map(|(ip, e)| (*ip, e.mac, e.expires.is_none()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    fn ms(x: u64) -> Instant {
        Instant::from_micros(x * 1000)
    }

    #[test]
    fn resolution_retries_then_fails() {
        let mut t = ArpTable::new(ArpConfig { retries: 3, ..ArpConfig::default() });
        assert_eq!(t.resolve(IP, ms(0)), Resolve::SendRequest);
        assert_eq!(t.resolve(IP, ms(1)), Resolve::InProgress);
        let (mut sent, mut failed) = (Vec::new(), Vec::new());
        for now in (0..=400).step_by(10) {
            t.poll(ms(now), |ip| sent.push((now, ip)), |ip| failed.push((now, ip)));
        }
        assert_eq!(sent, vec![(50, IP), (150, IP)], "two retries after the first, the wait doubling");
        assert_eq!(failed, vec![(350, IP)]);
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.resolve(IP, ms(500)), Resolve::SendRequest, "a later attempt starts afresh");
        // The defaults: requests at 0, 50, 150, 350, 750 and 1550 ms, failure at 2550 ms.
        let mut t = ArpTable::new(ArpConfig::default());
        t.resolve(IP, ms(0));
        let (mut sent, mut failed) = (vec![0], Vec::new());
        for now in 1..=3000 {
            t.poll(ms(now), |_| sent.push(now), |_| failed.push(now));
        }
        assert_eq!(sent, vec![0, 50, 150, 350, 750, 1550]);
        assert_eq!(failed, vec![2550]);
    }

    #[test]
    fn learned_entries_complete_resolution_and_age_out_static_ones_do_not() {
        let mut t = ArpTable::new(ArpConfig { timeout: Duration::from_secs(1), ..ArpConfig::default() });
        t.resolve(IP, ms(0));
        assert_eq!(t.on_reply(IP, MAC, ms(5)), Learned::Resolved, "the pending resolution completes");
        assert_eq!(t.resolve(IP, ms(6)), Resolve::Known(MAC));
        assert_eq!(t.lookup(IP, ms(1004)), Some(MAC));
        assert_eq!(t.lookup(IP, ms(1006)), None, "aged out");
        let other = Ipv4Addr::new(198, 18, 0, 3);
        t.add_static(other, MAC);
        assert_eq!(t.resolve(other, ms(0)), Resolve::Known(MAC));
        assert_eq!(t.on_reply(other, EthernetAddress([2, 0, 0, 0, 0, 9]), ms(0)), Learned::Ignored);
        assert!(!t.revalidate(other, ms(0)), "static entries are never re-resolved");
        assert_eq!(t.lookup(other, ms(1_000_000)), Some(MAC), "static entries never expire or change");
        t.resolve(IP, ms(2000));
        assert_eq!(
            t.on_reply(IP, EthernetAddress::BROADCAST, ms(2001)),
            Learned::Ignored,
            "broadcast MACs are not learned"
        );
    }

    /// A forged reply nobody asked for creates nothing and changes nothing; neither does a
    /// second reply to a request already answered.
    #[test]
    fn unsolicited_replies_are_not_believed() {
        let evil = EthernetAddress([2, 0xee, 0, 0, 0, 1]);
        let mut t = ArpTable::new(ArpConfig::default());
        assert_eq!(t.on_reply(IP, evil, ms(0)), Learned::Ignored);
        assert_eq!(t.lookup(IP, ms(1)), None, "no entry from an unsolicited reply");
        t.resolve(IP, ms(10));
        assert_eq!(t.on_reply(IP, MAC, ms(11)), Learned::Resolved);
        assert_eq!(t.on_reply(IP, evil, ms(12)), Learned::Ignored, "the resolution is over");
        assert_eq!(t.lookup(IP, ms(13)), Some(MAC));
    }

    /// Unanswered SYNs re-resolve an entry while it stays in use; a reply with a new MAC
    /// replaces it (the peer restarted), and a re-resolution nobody answers drops it.
    #[test]
    fn revalidation_follows_a_peer_that_moved_and_drops_one_that_is_gone() {
        let moved = EthernetAddress([2, 0, 0, 0, 0, 0x22]);
        let mut t = ArpTable::new(ArpConfig::default());
        assert!(!t.revalidate(IP, ms(0)), "nothing to re-resolve");
        t.resolve(IP, ms(0));
        t.on_reply(IP, MAC, ms(1));
        assert!(t.revalidate(IP, ms(100)));
        assert!(!t.revalidate(IP, ms(101)), "one re-resolution at a time");
        assert_eq!(t.resolve(IP, ms(102)), Resolve::Known(MAC), "still in use meanwhile");
        assert_eq!(t.on_reply(IP, moved, ms(103)), Learned::Changed);
        assert_eq!(t.lookup(IP, ms(104)), Some(moved));
        assert!(t.revalidate(IP, ms(200)));
        assert_eq!(t.on_reply(IP, moved, ms(201)), Learned::Resolved, "confirmed");
        assert!(t.revalidate(IP, ms(300)));
        let mut failed = Vec::new();
        for now in 300..3000 {
            t.poll(ms(now), |_| {}, |ip| failed.push(ip));
        }
        assert_eq!(failed, vec![IP]);
        assert_eq!(t.lookup(IP, ms(3000)), None, "an unanswered re-resolution drops the entry");
    }

    #[test]
    fn a_full_table_makes_room_from_aged_out_entries() {
        let mut t = ArpTable::new(ArpConfig { timeout: Duration::from_secs(1), capacity: 2, ..ArpConfig::default() });
        let ip = |k| Ipv4Addr::new(198, 18, 1, k);
        let learn = |t: &mut ArpTable, k, now| {
            t.resolve(ip(k), now);
            t.on_reply(ip(k), MAC, now)
        };
        learn(&mut t, 1, ms(0));
        learn(&mut t, 2, ms(0));
        learn(&mut t, 3, ms(10));
        assert_eq!(t.lookup(ip(3), ms(11)), None, "full of fresh entries: not stored");
        learn(&mut t, 3, ms(2000));
        assert_eq!(t.lookup(ip(3), ms(2001)), Some(MAC), "the aged-out entries made room");
    }
}
