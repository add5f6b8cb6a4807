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
//! * a MAC that claims an address while no resolution of ours for it is in progress and none
//!   was asked for in the last [`ASK_WINDOW`] is a *suspect* for [`SUSPECT_FOR`]: an attacker
//!   who sends lies continuously (they reach us between resolutions too) loses to the peer's
//!   real answer even when a lie lands inside a resolution. A suspect's reply during a
//!   resolution is kept aside and used only if no other reply has come when the next request
//!   is due (a real peer that announced itself unasked is delayed, not cut off). Requests of
//!   every shard count as asked (the shards tell each other, [`ArpTable::note_asked`]), since
//!   replies reach the shard that owns queue 0 whichever shard asked.
//!
//! What remains: an attacker who sends nothing until it sees a request, and then answers it
//! faster than the peer, wins each time. Static entries are the defence against that.

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
    /// A suspect's answer, used if no other has come when the next request is due.
    fallback: Option<EthernetAddress>,
}

impl Pending {
    fn started(now: Instant, retry: Duration) -> Pending {
        Pending { sent: 1, next: now + retry, interval: retry, fallback: None }
    }
}

/// A reply this long after our last request for its address is unsolicited.
pub const ASK_WINDOW: Duration = Duration::from_secs(3);

/// How long an unsolicited claim keeps its MAC suspect for that address.
pub const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// Longest wait between two requests of one resolution.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What a reply did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Nothing: no resolution of ours was waiting for it (or it named a static entry, or came
    /// from a suspect and was kept aside).
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
    /// When a request for each address last went out, from any shard.
    asked: HashMap<Ipv4Addr, Instant>,
    /// Unsolicited claims: (address, MAC) and until when they stay suspect.
    suspects: HashMap<(Ipv4Addr, EthernetAddress), Instant>,
    /// Claims that made a MAC suspect.
    pub suspected: u64,
}

impl ArpTable {
    /// An empty table with room for `cfg.capacity` entries.
    pub fn new(cfg: ArpConfig) -> Self {
        ArpTable {
            cfg,
            entries: HashMap::with_capacity(cfg.capacity),
            pending: HashMap::with_capacity(cfg.capacity),
            asked: HashMap::with_capacity(cfg.capacity),
            suspects: HashMap::with_capacity(cfg.capacity),
            suspected: 0,
        }
    }

    /// A request for `ip` goes out now (from this shard or, told through the mesh, another).
    pub fn note_asked(&mut self, ip: Ipv4Addr, now: Instant) {
        if self.asked.len() >= self.cfg.capacity && !self.asked.contains_key(&ip) {
            self.asked.retain(|_, t| now.saturating_since(*t) < ASK_WINDOW);
        }
        if self.asked.len() < self.cfg.capacity || self.asked.contains_key(&ip) {
            self.asked.insert(ip, now);
        }
    }

    fn is_suspect(&self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) -> bool {
        self.suspects.get(&(ip, mac)).is_some_and(|&until| until > now)
    }

    /// A claim nobody asked for: its MAC becomes suspect for `ip`, unless a request for `ip`
    /// went out recently (a late or duplicate answer).
    fn unsolicited(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) {
        if self.asked.get(&ip).is_some_and(|&t| now.saturating_since(t) < ASK_WINDOW) {
            return;
        }
        let key = (ip, mac);
        if self.suspects.len() >= self.cfg.capacity && !self.suspects.contains_key(&key) {
            self.suspects.retain(|_, until| *until > now);
        }
        let room = self.suspects.len() < self.cfg.capacity || self.suspects.contains_key(&key);
        if room && self.suspects.insert(key, now + SUSPECT_FOR).is_none_or(|until| until <= now) {
            self.suspected += 1;
        }
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
        if !mac.is_unicast() || ip.is_unspecified() {
            return Learned::Ignored;
        }
        let suspect = self.is_suspect(ip, mac, now);
        match self.pending.get_mut(&ip) {
            None => {
                self.unsolicited(ip, mac, now);
                return Learned::Ignored;
            }
            Some(p) if suspect => {
                p.fallback = Some(mac);
                return Learned::Ignored;
            }
            Some(_) => {
                self.pending.remove(&ip);
            }
        }
        self.learn(ip, mac, now)
    }

    /// A resolution of `ip` completed with `mac`.
    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) -> Learned {
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
        self.pending.insert(ip, Pending::started(now, self.cfg.retry));
        self.note_asked(ip, now);
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
        self.pending.insert(ip, Pending::started(now, self.cfg.retry));
        self.note_asked(ip, now);
        Resolve::SendRequest
    }

    /// Drives resolutions: `send(ip)` for each request due, `failed(ip)` for each that ran out
    /// of retries, `learned(ip, mac, what)` for each completed by a suspect's answer kept aside
    /// (no other came before the next request was due); drops expired entries. Call when
    /// [`next_deadline`](Self::next_deadline) passes.
    pub fn poll(
        &mut self,
        now: Instant,
        mut send: impl FnMut(Ipv4Addr),
        mut failed: impl FnMut(Ipv4Addr),
        mut learned: impl FnMut(Ipv4Addr, EthernetAddress, Learned),
    ) {
        let retries = self.cfg.retries;
        let capacity = self.cfg.capacity;
        let entries = &mut self.entries;
        let asked = &mut self.asked;
        let mut fallbacks: arrayvec::ArrayVec<(Ipv4Addr, EthernetAddress), 16> = arrayvec::ArrayVec::new();
        self.pending.retain(|ip, p| {
            if p.next > now {
                return true;
            }
            if let Some(mac) = p.fallback {
                if fallbacks.try_push((*ip, mac)).is_ok() {
                    return false;
                }
                // (More than 16 at once: the rest wait for the next poll.)
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
            // Within the table's capacity, as `note_asked` (the map never grows after start).
            if let Some(t) = asked.get_mut(ip) {
                *t = now;
            } else if asked.len() < capacity {
                asked.insert(*ip, now);
            }
            true
        });
        for (ip, mac) in fallbacks {
            learned(ip, mac, self.learn(ip, mac, now));
        }
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
            t.poll(ms(now), |ip| sent.push((now, ip)), |ip| failed.push((now, ip)), |_, _, _| panic!("no suspects"));
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
            t.poll(ms(now), |_| sent.push(now), |_| failed.push(now), |_, _, _| {});
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
            t.poll(ms(now), |_| {}, |ip| failed.push(ip), |_, _, _| {});
        }
        assert_eq!(failed, vec![IP]);
        assert_eq!(t.lookup(IP, ms(3000)), None, "an unanswered re-resolution drops the entry");
    }

    /// A liar who sends continuously is seen between resolutions and becomes a suspect: its
    /// lie inside a resolution loses to the peer's answer, and is used only when nothing else
    /// came by the next request (a real peer that announced itself unasked still resolves).
    #[test]
    fn a_continuous_liar_loses_to_the_real_answer() {
        let evil = EthernetAddress([2, 0xee, 0, 0, 0, 1]);
        let mut t = ArpTable::new(ArpConfig::default());
        assert_eq!(t.on_reply(IP, evil, ms(0)), Learned::Ignored);
        assert_eq!(t.suspected, 1);
        t.on_reply(IP, evil, ms(1));
        assert_eq!(t.suspected, 1, "one suspect, counted once");
        assert_eq!(t.resolve(IP, ms(10)), Resolve::SendRequest);
        assert_eq!(t.on_reply(IP, evil, ms(11)), Learned::Ignored, "the suspect's lie is kept aside");
        assert_eq!(t.lookup(IP, ms(11)), None);
        assert_eq!(t.on_reply(IP, MAC, ms(12)), Learned::Resolved, "the real answer wins");
        assert_eq!(t.lookup(IP, ms(13)), Some(MAC));
        // Only the suspect answers: the resolution completes with it when the retry is due.
        let other = Ipv4Addr::new(198, 18, 0, 3);
        t.on_reply(other, evil, ms(100));
        t.resolve(other, ms(5000));
        assert_eq!(t.on_reply(other, evil, ms(5001)), Learned::Ignored);
        let mut learned = Vec::new();
        let mut sent = 0;
        for now in 5001..5100 {
            t.poll(ms(now), |_| sent += 1, |_| panic!("not failed"), |ip, mac, l| learned.push((now, ip, mac, l)));
        }
        assert_eq!(learned, vec![(5050, other, evil, Learned::Resolved)]);
        assert_eq!(sent, 0, "completed instead of asking again");
        assert_eq!(t.lookup(other, ms(5051)), Some(evil));
    }

    /// Answers that come soon after a request (a late or duplicate answer, or one to another
    /// shard's request) make nobody a suspect.
    #[test]
    fn answers_to_recent_requests_are_not_suspect() {
        let mut t = ArpTable::new(ArpConfig::default());
        t.resolve(IP, ms(0));
        assert_eq!(t.on_reply(IP, MAC, ms(1)), Learned::Resolved);
        assert_eq!(t.on_reply(IP, MAC, ms(2)), Learned::Ignored, "a duplicate");
        let other = Ipv4Addr::new(198, 18, 0, 3);
        t.note_asked(other, ms(10));
        assert_eq!(t.on_reply(other, MAC, ms(20)), Learned::Ignored, "another shard's resolution");
        assert_eq!(t.suspected, 0);
        assert_eq!(t.on_reply(other, MAC, ms(3020)), Learned::Ignored);
        assert_eq!(t.suspected, 1, "3 s after the request, a claim is unsolicited");
        // The suspect is forgotten after a minute.
        t.resolve(other, ms(70_000));
        assert_eq!(t.on_reply(other, MAC, ms(70_001)), Learned::Resolved);
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
