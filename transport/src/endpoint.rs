//! The endpoint: the flows of one shard, their lookup tables and the work queue.

use crate::cookie::{Conn, CookieOpts, Cookies, Evicted};
use crate::env::Env;
use crate::flow::{fl, Flow, FlowCx, FlowState, Path, RxSlot, TxSlot, Verdict, NO_OWNER};
use crate::ports::{ClientPortQuery, LocalPorts, PortAllocator};
use crate::{Config, Error, Event, FlowId, FlowTuple, LocalAddr, OutMsg, Owner};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::hash::{BuildHasher, Hasher};
use core::net::Ipv4Addr;
use core::time::Duration;
use hashbrown::HashMap;
use machnet_net::rss::Rss;
use machnet_net::time::Instant;
use machnet_net::wire::{EthernetAddress, FrameRepr, MachnetFrame, MachnetRepr, MsgFlags, PacketType};

/// Endpoint-wide counters. Plain integers; the daemon publishes snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EndpointStats {
    /// Machnet packets handed to [`Endpoint::handle`].
    pub rx_packets: u64,
    /// Packets for another IP.
    pub rx_not_for_us: u64,
    /// Packets for no flow and no listener.
    pub rx_no_flow: u64,
    /// DATA packets accepted into a receive ring.
    pub rx_data: u64,
    /// Duplicate DATA packets (acknowledged again).
    pub rx_duplicate: u64,
    /// DATA packets beyond the receive window.
    pub rx_out_of_window: u64,
    /// DATA packets dropped for lack of a receive buffer (not acknowledged).
    pub rx_no_buffer: u64,
    /// DATA packets with an empty or oversized payload.
    pub rx_bad_length: u64,
    /// Messages discarded because the peer's fragment flags were inconsistent or too long.
    pub rx_bad_framing: u64,
    /// ACKs acknowledging what was never sent.
    pub rx_bad_ack: u64,
    /// Packets of an unknown type.
    pub rx_unknown_type: u64,
    /// Packets that made no sense in the flow's state.
    pub rx_unexpected: u64,
    /// DATA that would have completed a server's handshake (its client's final ACK lost, or a
    /// forged source that never saw our SYN-ACK): dropped, answered with the SYN-ACK again.
    pub rx_unproven_data: u64,
    /// RSTs accepted.
    pub rx_rsts: u64,
    /// RSTs outside the window, ignored.
    pub rx_rst_ignored: u64,
    /// Messages delivered.
    pub rx_messages: u64,
    /// Bytes delivered.
    pub rx_bytes: u64,
    /// Times a flow found the application's ring full.
    pub deliver_blocked: u64,
    /// Held out-of-order packets freed to make room for lower ones (receive pool exhausted).
    pub rx_reneged: u64,
    /// Messages accepted for sending.
    pub tx_messages: u64,
    /// Bytes accepted for sending.
    pub tx_bytes: u64,
    /// DATA packets sent for the first time.
    pub tx_data: u64,
    /// DATA frames sent again (loss recovery, timeouts and tail-loss probes alike).
    pub tx_retransmits: u64,
    /// Pure ACKs sent.
    pub tx_acks: u64,
    /// Owed ACKs that DATA carried instead of a pure ACK (flows with ACKs in DATA).
    pub tx_acks_in_data: u64,
    /// Owed ACKs held back to wait for DATA (`ack_delay`); each went out in DATA or, at its
    /// deadline, as a pure ACK.
    pub acks_delayed: u64,
    /// RSTs sent.
    pub tx_rsts: u64,
    /// Transmit attempts that found no buffer.
    pub tx_no_buffer: u64,
    /// Transmit chains that ended before their announced length.
    pub tx_chain_errors: u64,
    /// Fast recoveries entered.
    pub fast_recoveries: u64,
    /// Tail-loss probes sent (also counted in `tx_retransmits`).
    pub tail_probes: u64,
    /// Retransmission timeouts.
    pub rto_fired: u64,
    /// Timeouts found spurious (the ACK was late, not lost) and undone.
    pub spurious_rto: u64,
    /// Flows opened (both directions).
    pub flows_opened: u64,
    /// Flows that failed after retransmission timeouts.
    pub flows_failed: u64,
    /// Connects refused by RST.
    pub connect_refused: u64,
    /// Connects that timed out.
    pub connect_timeouts: u64,
    /// Server handshakes abandoned.
    pub accept_timeouts: u64,
    /// SYNs to ports nobody listens on (answered with RST).
    pub syn_no_listener: u64,
    /// SYNs dropped because the flow table was full.
    pub syn_table_full: u64,
    /// New SYNs on the ports of an established flow, answered with a challenge ACK (the peer
    /// restarted).
    pub syn_challenged: u64,
    /// SYNs and SYN-ACKs sent again after a handshake timeout.
    pub syn_retransmits: u64,
    /// Half-open flows evicted to make room (the oldest first): a SYN flood's footprint.
    pub syn_evicted: u64,
    /// Server flows rebuilt from the client's final ACK (or its first DATA, with ACKs in DATA)
    /// whose `ackno` proved the handshake (a SYN cookie) after their half-open flow had been
    /// evicted.
    pub syn_cookies_accepted: u64,
    /// SYNs dropped because their source already had `max_half_open_per_source` half-open
    /// flows.
    pub syn_source_limited: u64,
    /// SYNs and connects refused because the owner's group (application) holds
    /// `max_flows_per_group` flows.
    pub group_limited: u64,
}

/// Per-flow counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FlowCounters {
    /// Messages sent.
    pub tx_messages: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Messages delivered.
    pub rx_messages: u64,
    /// Bytes delivered.
    pub rx_bytes: u64,
    /// Packets retransmitted.
    pub retransmits: u64,
}

/// A snapshot of one flow, for statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowInfo {
    /// Handle.
    pub id: FlowId,
    /// Addresses.
    pub tuple: FlowTuple,
    /// Owner.
    pub owner: Owner,
    /// State.
    pub state: FlowState,
    /// Congestion window (packets).
    pub cwnd: f64,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Smallest RTT sample (the path's base RTT, as far as the flow knows).
    pub min_rtt: Duration,
    /// Packets in flight.
    pub in_flight: u32,
    /// Packets queued, not yet sent.
    pub queued: u32,
    /// Oldest sequence number sent and not yet acknowledged (during a handshake: our ISN).
    pub snd_una: u32,
    /// Next sequence number to send (`snd_una + in_flight`).
    pub snd_nxt: u32,
    /// Next sequence number expected from the peer (the cumulative `ackno` we send); the
    /// receive window is `rcv_nxt .. rcv_nxt + window`.
    pub rcv_nxt: u32,
    /// The peer is an original Machnet.
    pub legacy_peer: bool,
    /// Both ends carry acknowledgements in DATA (negotiated at the handshake).
    pub acks_in_data: bool,
    /// Counters.
    pub counters: FlowCounters,
}

/// A fast keyed hash for the flow and listener maps (multiply-fold over a per-endpoint seed,
/// so remote peers cannot precompute collisions).
#[derive(Clone, Copy)]
struct KeyedHash(u64);

struct KeyedHasher {
    seed: u64,
    acc: u64,
}

impl BuildHasher for KeyedHash {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher { seed: self.0, acc: 0 }
    }
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.acc = self.acc.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.acc ^= u64::from(v);
    }
    fn write_u64(&mut self, v: u64) {
        self.acc ^= v;
    }
    fn finish(&self) -> u64 {
        let m = u128::from(self.acc ^ self.seed) * 0x9e37_79b9_7f4a_7c15_u128;
        (m as u64) ^ ((m >> 64) as u64)
    }
}

fn key(remote_ip: u32, remote_port: u16, local_port: u16) -> u64 {
    (u64::from(remote_ip) << 32) | (u64::from(remote_port) << 16) | u64::from(local_port)
}

/// The flows of one shard. `P` gives out its local ports ([`PortAllocator`]; a plain
/// [`LocalPorts`] by default, a handle on a shared table when shards share the local IP).
pub struct Endpoint<P = LocalPorts> {
    cfg: Config,
    local: LocalAddr,
    flows: Vec<Flow>,
    tx: Vec<TxSlot>,
    rx: Vec<RxSlot>,
    tokens: Vec<u64>,
    counters: Vec<FlowCounters>,
    free: Vec<u32>,
    map: HashMap<u64, u32, KeyedHash>,
    /// The last entry `map` gave (key, flow index): packets come in runs of one flow (a
    /// burst, a request and its answer), and the hash and probe cost more than the rest of the
    /// demultiplexing. Forgotten whenever an entry leaves `map` (so it always names one in it).
    last: Option<(u64, u32)>,
    /// Per-peer path state (base RTT), refcounted by the flows to each peer.
    paths: Vec<Path>,
    path_map: HashMap<u32, u32, KeyedHash>,
    path_free: Vec<u32>,
    listeners: HashMap<u16, Owner, KeyedHash>,
    /// Accepted flows per local port: a listener's port stays taken (and owned by this shard)
    /// until its last accepted flow is gone, even after the listener closes.
    server_refs: Vec<u32>,
    ports: P,
    rss: Option<Rss>,
    queue: u16,
    work: VecDeque<u32>,
    /// Flows whose owner refused a message, waiting for [`Endpoint::on_writable`].
    blocked: Vec<u32>,
    /// Half-open flows, oldest first, as (index, generation); entries of flows that have since
    /// been established or freed are skipped when met.
    half_open: VecDeque<(u32, u32)>,
    half_open_count: usize,
    /// Remote IPs whose SYNs went unanswered, for [`Endpoint::take_unanswered`].
    unanswered: ArrayVec<u32, 64>,
    /// Each owner's group (the daemon: its application) and the flows each group holds
    /// (established and client flows: half-open ones have their own budget).
    owner_group: Vec<u16>,
    group_flows: Vec<u32>,
    rng: u64,
    /// The key of server flows' ISNs (SYN cookies: [`crate::cookie`]).
    cookies: Cookies,
    /// Half-open flows evicted lately: the only ones a cookie may rebuild.
    evicted: Evicted,
    stats: EndpointStats,
}

impl<P: PortAllocator> core::fmt::Debug for Endpoint<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("flows", &self.flow_count())
            .finish_non_exhaustive()
    }
}

/// Most listening ports per endpoint.
pub const MAX_LISTENERS: usize = 1024;

impl<P: PortAllocator> Endpoint<P> {
    /// Creates an endpoint, reserving memory for `cfg.max_flows` flows and their windows.
    /// Its local ports come from `ports`.
    pub fn new(mut cfg: Config, local: LocalAddr, ports: P) -> Result<Self, &'static str> {
        cfg.validate()?;
        let n = cfg.max_flows;
        cfg.max_half_open = cfg.max_half_open.min(n);
        cfg.max_half_open_per_source = cfg.max_half_open_per_source.min(cfg.max_half_open);
        cfg.max_flows_per_group = cfg.max_flows_per_group.min(n);
        let w = cfg.window;
        let seed = cfg.seed ^ 0xa076_1d64_78bd_642f;
        let mut free: Vec<u32> = (0..n as u32).collect();
        free.reverse();
        Ok(Endpoint {
            local,
            flows: vec![Flow::empty(); n],
            tx: vec![TxSlot::default(); n * w],
            rx: vec![RxSlot::default(); n * w],
            tokens: vec![0; n],
            counters: vec![FlowCounters::default(); n],
            free,
            map: HashMap::with_capacity_and_hasher(n, KeyedHash(seed)),
            last: None,
            paths: vec![Path::default(); n],
            path_map: HashMap::with_capacity_and_hasher(n, KeyedHash(seed.rotate_left(31))),
            path_free: (0..n as u32).rev().collect(),
            listeners: HashMap::with_capacity_and_hasher(MAX_LISTENERS, KeyedHash(seed.rotate_left(17))),
            server_refs: vec![0; 1 << 16],
            ports,
            rss: None,
            queue: 0,
            work: VecDeque::with_capacity(n),
            blocked: Vec::with_capacity(n),
            half_open: VecDeque::with_capacity(2 * cfg.max_half_open),
            half_open_count: 0,
            unanswered: ArrayVec::new(),
            owner_group: Vec::new(),
            group_flows: Vec::new(),
            rng: cfg.seed,
            cookies: Cookies::new(cfg.seed),
            evicted: Evicted::new(),
            stats: EndpointStats::default(),
            cfg,
        })
    }

    /// Steering for client source ports: the device's RSS state and this shard's queue, which
    /// is also the shard's name to its [`PortAllocator`]. Without RSS every port
    /// is acceptable.
    pub fn set_steering(&mut self, rss: Option<Rss>, queue: u16) {
        self.rss = rss;
        self.queue = queue;
    }

    /// The port allocator (for a shared one, the owner of each port).
    pub fn ports(&self) -> &P {
        &self.ports
    }

    /// Local addresses.
    pub fn local(&self) -> LocalAddr {
        self.local
    }

    /// Parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Live flows.
    pub fn flow_count(&self) -> usize {
        self.cfg.max_flows - self.free.len()
    }

    fn next_isn(&mut self) -> u32 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }

    fn live(&self, id: FlowId) -> Option<usize> {
        let i = id.index as usize;
        let f = self.flows.get(i)?;
        (f.has(fl::LIVE) && f.gen == id.gen).then_some(i)
    }

    fn id_of(&self, i: usize) -> FlowId {
        FlowId { index: i as u32, gen: self.flows[i].gen }
    }

    /// Lends flow `i` with everything its logic needs.
    fn cx<'a, E: Env>(&'a mut self, i: usize, env: &'a mut E, now: Instant) -> FlowCx<'a, E> {
        self.cx_at(i, env, now, now)
    }

    #[inline(always)]
    fn cx_at<'a, E: Env>(&'a mut self, i: usize, env: &'a mut E, now: Instant, rx_at: Instant) -> FlowCx<'a, E> {
        let w = self.cfg.window;
        let id = FlowId { index: i as u32, gen: self.flows[i].gen };
        let path = self.flows[i].path as usize;
        FlowCx {
            id,
            f: &mut self.flows[i],
            tx: &mut self.tx[i * w..(i + 1) * w],
            rx: &mut self.rx[i * w..(i + 1) * w],
            c: &mut self.counters[i],
            path: &mut self.paths[path],
            cfg: &self.cfg,
            local: self.local,
            env,
            stats: &mut self.stats,
            now,
            rx_at,
        }
    }

    /// Takes a free slot and initialises a flow in it.
    fn alloc_flow(
        &mut self,
        owner: Owner,
        remote_ip: Ipv4Addr,
        remote_mac: EthernetAddress,
        remote_port: u16,
        local_port: u16,
    ) -> Option<usize> {
        let i = self.free.pop()? as usize;
        let f = &mut self.flows[i];
        let gen = f.gen;
        let listed = f.flags & (fl::IN_WORK | fl::PARKED);
        *f = Flow::empty();
        f.gen = gen;
        f.flags = fl::LIVE | listed;
        f.owner = owner;
        f.remote_ip = u32::from(remote_ip);
        f.remote_port = remote_port;
        f.local_port = local_port;
        f.remote_mac = remote_mac;
        f.cc = crate::cc::CongestionControl::new(&self.cfg.cc);
        // The path to this peer, shared with its other flows (one path per flow at most, so
        // the free list never runs dry while a flow slot is free).
        let ip = u32::from(remote_ip);
        let p = match self.path_map.get(&ip) {
            Some(&p) => p,
            None => {
                let p = self.path_free.pop().expect("a path per flow slot");
                self.paths[p as usize] = Path::new(ip);
                self.path_map.insert(ip, p);
                p
            }
        };
        self.paths[p as usize].flows += 1;
        self.flows[i].path = p;
        self.counters[i] = FlowCounters::default();
        self.map.insert(key(u32::from(remote_ip), remote_port, local_port), i as u32);
        self.stats.flows_opened += 1;
        Some(i)
    }

    fn free_flow<E: Env>(&mut self, i: usize, env: &mut E, now: Instant, event: Option<Event>) {
        {
            let mut cx = self.cx(i, env, now);
            cx.release_all();
        }
        let id = self.id_of(i);
        if !self.leave_half_open(i) {
            let g = self.group_of(self.flows[i].owner);
            self.group_flows[g] -= 1;
        }
        let f = &mut self.flows[i];
        let (owner, client, local_port) = (f.owner, f.has(fl::CLIENT), f.local_port);
        env.rx_released(owner, id);
        let path = &mut self.paths[f.path as usize];
        path.flows -= 1;
        if path.flows == 0 {
            self.path_map.remove(&path.ip);
            self.path_free.push(f.path);
        }
        if !f.has(fl::UNMAPPED) {
            self.map.remove(&key(f.remote_ip, f.remote_port, f.local_port));
            self.last = None;
        }
        if f.timer_at != 0 {
            env.set_timer(id, None);
        }
        if f.has(fl::PARKED) {
            // It waited for room in its application's ring: it waits no more.
            if let Some(k) = self.blocked.iter().position(|&b| b as usize == i) {
                self.blocked.swap_remove(k);
            }
        }
        f.flags &= fl::IN_WORK;
        f.gen = f.gen.wrapping_add(1);
        f.owner = NO_OWNER;
        self.free.push(i as u32);
        if client {
            self.ports.release(local_port);
        } else {
            let refs = &mut self.server_refs[usize::from(local_port)];
            *refs = refs.saturating_sub(1);
            if *refs == 0 && !self.listeners.contains_key(&local_port) {
                // The listener closed earlier; its last flow is gone.
                self.ports.release(local_port);
            }
        }
        if let Some(ev) = event {
            env.event(owner, ev);
        }
    }

    /// The group of `owner` (0 unless [`set_owner_group`](Self::set_owner_group) said).
    fn group_of(&mut self, owner: Owner) -> usize {
        let g = self.owner_group.get(owner as usize).copied().unwrap_or(0) as usize;
        if g >= self.group_flows.len() {
            // Only for an owner no group was set for (group 0), on its first flow.
            self.group_flows.resize(g + 1, 0);
        }
        g
    }

    /// Puts `owner` in group `group` (the daemon: one group per application on this shard),
    /// whose flows together may number `max_flows_per_group`. Call before the owner's first
    /// flow (it allocates here, never on the packet path).
    pub fn set_owner_group(&mut self, owner: Owner, group: u16) {
        let o = owner as usize;
        if self.owner_group.len() <= o {
            self.owner_group.resize(o + 1, 0);
        }
        self.owner_group[o] = group;
        if self.group_flows.len() <= usize::from(group) {
            self.group_flows.resize(usize::from(group) + 1, 0);
        }
    }

    /// Whether `owner`'s group may open one more flow.
    fn group_has_room(&mut self, owner: Owner) -> bool {
        let g = self.group_of(owner);
        (self.group_flows[g] as usize) < self.cfg.max_flows_per_group
    }

    /// Counts flow `i` (just accepted from a SYN) in the half-open budget.
    fn enter_half_open(&mut self, i: usize) {
        if self.half_open.len() == self.half_open.capacity() {
            // Drop the entries of flows no longer half-open (no allocation).
            let flows = &self.flows;
            self.half_open.retain(|&(j, gen)| {
                let f = &flows[j as usize];
                f.gen == gen && f.has(fl::LIVE) && f.has(fl::HALF_OPEN)
            });
        }
        let f = &mut self.flows[i];
        f.set(fl::HALF_OPEN);
        self.paths[f.path as usize].half_open += 1;
        self.half_open_count += 1;
        if self.half_open.len() < self.half_open.capacity() {
            self.half_open.push_back((i as u32, f.gen));
        }
    }

    /// Takes flow `i` out of the half-open budget (established or freed); false if it was not
    /// in it.
    fn leave_half_open(&mut self, i: usize) -> bool {
        let f = &mut self.flows[i];
        if !f.has(fl::HALF_OPEN) {
            return false;
        }
        f.clear(fl::HALF_OPEN);
        let p = &mut self.paths[f.path as usize];
        p.half_open = p.half_open.saturating_sub(1);
        self.half_open_count -= 1;
        true
    }

    /// Frees the oldest half-open flow (silently: its client, if real, retries its SYN).
    /// Returns whether there was one.
    fn evict_half_open<E: Env>(&mut self, env: &mut E, now: Instant) -> bool {
        while let Some((j, gen)) = self.half_open.pop_front() {
            let f = &self.flows[j as usize];
            if f.gen == gen && f.has(fl::LIVE) && f.has(fl::HALF_OPEN) {
                self.stats.syn_evicted += 1;
                let conn = Conn {
                    peer_ip: f.remote_ip,
                    peer_port: f.remote_port,
                    local_ip: u32::from(self.local.ip),
                    local_port: f.local_port,
                    client_isn: f.irs,
                };
                let slot = self.cookies.slot(conn);
                self.evicted.record(now.as_nanos(), slot);
                self.free_flow(j as usize, env, now, None);
                return true;
            }
        }
        false
    }

    /// Half-open flows now.
    pub fn half_open_count(&self) -> usize {
        self.half_open_count
    }

    /// Remote IPs with half-open flows, and how many each (for statistics).
    pub fn half_open_sources(&self) -> impl Iterator<Item = (Ipv4Addr, u32)> + '_ {
        self.path_map
            .values()
            .map(|&p| &self.paths[p as usize])
            .filter(|p| p.half_open > 0)
            .map(|p| (Ipv4Addr::from(p.ip), p.half_open))
    }

    fn mark_work(&mut self, i: usize) {
        let f = &mut self.flows[i];
        if !f.has(fl::IN_WORK) {
            f.set(fl::IN_WORK);
            self.work.push_back(i as u32);
        }
    }

    /// Applies a verdict: frees the flow, or syncs its timer and queues pending work.
    #[inline(always)]
    fn settle<E: Env>(&mut self, i: usize, v: Verdict, env: &mut E, now: Instant) {
        match v {
            Verdict::Free(ev) => self.free_flow(i, env, now, ev),
            Verdict::Keep => {
                if self.flows[i].has(fl::HALF_OPEN) && self.flows[i].state != FlowState::SynReceived {
                    // Established: it counts in its owner's group from now on.
                    self.leave_half_open(i);
                    let g = self.group_of(self.flows[i].owner);
                    self.group_flows[g] += 1;
                }
                let id = self.id_of(i);
                let f = &mut self.flows[i];
                if f.state == FlowState::PeerClosed && !f.has(fl::UNMAPPED) {
                    self.map.remove(&key(f.remote_ip, f.remote_port, f.local_port));
                    self.last = None;
                    f.set(fl::UNMAPPED);
                }
                // Lazy timer: only move the armed deadline earlier; a late firing re-arms.
                let d = f.deadline();
                if d != 0 && (f.timer_at == 0 || d < f.timer_at) {
                    f.timer_at = d;
                    env.set_timer(id, Some(Instant(d)));
                }
                if f.has(fl::BLOCKED) {
                    if !f.has(fl::PARKED) {
                        f.set(fl::PARKED);
                        self.blocked.push(i as u32);
                    }
                    if f.has(fl::ACK_PENDING) {
                        self.mark_work(i);
                    }
                } else if f.has(fl::ACK_PENDING | fl::HAS_PENDING | fl::TX_STALLED) || f.pend_count > 0 || f.lost > 0 {
                    self.mark_work(i);
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Control operations
    // ---------------------------------------------------------------------------------------

    /// Listens on `port` of the local IP for `owner`.
    pub fn listen(&mut self, owner: Owner, port: u16) -> Result<(), Error> {
        if self.listeners.len() >= MAX_LISTENERS {
            return Err(Error::TableFull);
        }
        if self.listeners.contains_key(&port) {
            return Err(Error::PortInUse);
        }
        // A port whose listener closed while its flows live on is still this shard's: listening
        // on it again is allowed.
        let ours = self.server_refs[usize::from(port)] > 0;
        if !ours && !self.ports.reserve(port, self.queue) {
            return Err(Error::PortInUse);
        }
        self.listeners.insert(port, owner);
        Ok(())
    }

    /// Stops listening on `port`. Flows already accepted continue.
    pub fn unlisten(&mut self, owner: Owner, port: u16) -> Result<(), Error> {
        match self.listeners.get(&port) {
            Some(&o) if o == owner => {
                self.listeners.remove(&port);
                if self.server_refs[usize::from(port)] == 0 {
                    self.ports.release(port);
                }
                Ok(())
            }
            Some(_) => Err(Error::NotOwner),
            None => Err(Error::NoSuchFlow),
        }
    }

    /// The owner listening on `port`, if any.
    pub fn listener(&self, port: u16) -> Option<Owner> {
        self.listeners.get(&port).copied()
    }

    /// Opens a flow to `remote_ip:remote_port` (whose next hop has `remote_mac`): picks the
    /// lowest source port that steers replies to this shard and sends a SYN. The outcome
    /// arrives as [`Event::Connected`] or [`Event::ConnectFailed`] carrying `token`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect<E: Env>(
        &mut self,
        now: Instant,
        env: &mut E,
        owner: Owner,
        remote_ip: Ipv4Addr,
        remote_mac: EthernetAddress,
        remote_port: u16,
        token: u64,
    ) -> Result<FlowId, Error> {
        if !self.group_has_room(owner) {
            self.stats.group_limited += 1;
            return Err(Error::TooManyFlows);
        }
        // A client connect takes a half-open server flow's slot if it must.
        if self.free.is_empty() && !self.evict_half_open(env, now) {
            return Err(Error::TooManyFlows);
        }
        let query = ClientPortQuery::new(self.rss.as_ref(), self.queue, self.local.ip, remote_ip, remote_port);
        let port = self.ports.reserve_client(&query).ok_or(Error::NoPortAvailable)?;
        let i = self.alloc_flow(owner, remote_ip, remote_mac, remote_port, port).ok_or(Error::TooManyFlows)?;
        self.flows[i].set(fl::CLIENT);
        let g = self.group_of(owner);
        self.group_flows[g] += 1;
        self.tokens[i] = token;
        let iss = self.next_isn();
        let mut cx = self.cx(i, env, now);
        cx.start_connect(iss);
        let id = cx.id;
        self.settle(i, Verdict::Keep, env, now);
        Ok(id)
    }

    /// Queues a message on an established flow; it leaves at the next [`flush`](Self::flush),
    /// stamped with the time given there (queueing needs no time: a caller need not read its
    /// clock for it). On error the caller still owns the segments.
    pub fn send<E: Env>(&mut self, env: &mut E, flow: FlowId, msg: &OutMsg) -> Result<(), Error> {
        let i = self.live(flow).ok_or(Error::NoSuchFlow)?;
        if msg.count == 0 || msg.len == 0 || msg.len as usize > self.cfg.max_message {
            return Err(Error::BadMessage);
        }
        let f = &mut self.flows[i];
        if f.state != FlowState::Established {
            return Err(Error::NotEstablished);
        }
        if f.pend_count == 0 {
            f.pend_head = msg.head;
        } else {
            env.tx_link(f.owner, f.pend_tail, msg.head);
        }
        f.pend_tail = msg.tail;
        f.pend_count += msg.count;
        self.stats.tx_messages += 1;
        self.stats.tx_bytes += u64::from(msg.len);
        let c = &mut self.counters[i];
        c.tx_messages += 1;
        c.tx_bytes += u64::from(msg.len);
        self.mark_work(i);
        Ok(())
    }

    /// Graceful close: no more messages; once everything queued is acknowledged an RST goes
    /// out and [`Event::Closed`] follows. Received messages keep being delivered until then.
    pub fn close<E: Env>(&mut self, now: Instant, env: &mut E, flow: FlowId) -> Result<(), Error> {
        let i = self.live(flow).ok_or(Error::NoSuchFlow)?;
        match self.flows[i].state {
            FlowState::Established => {
                self.flows[i].state = FlowState::Closing;
                let mut cx = self.cx(i, env, now);
                let v = cx.close_if_drained();
                self.settle(i, v, env, now);
                Ok(())
            }
            FlowState::Closing => Ok(()),
            _ => self.abort(now, env, flow),
        }
    }

    /// Abort: RST now, every segment released, no event.
    pub fn abort<E: Env>(&mut self, now: Instant, env: &mut E, flow: FlowId) -> Result<(), Error> {
        let i = self.live(flow).ok_or(Error::NoSuchFlow)?;
        if self.flows[i].state != FlowState::PeerClosed {
            let mut cx = self.cx(i, env, now);
            cx.send_rst();
        }
        self.free_flow(i, env, now, None);
        Ok(())
    }

    /// Closes `owner`'s listeners and starts a graceful close of all its flows (queued data
    /// drains, then RST). Returns the number of flows closing.
    pub fn close_owner_gracefully<E: Env>(&mut self, now: Instant, env: &mut E, owner: Owner) -> usize {
        self.unlisten_owner(owner);
        let mut n = 0;
        for i in 0..self.flows.len() {
            let f = &self.flows[i];
            if f.has(fl::LIVE) && f.owner == owner {
                let id = self.id_of(i);
                let _ = self.close(now, env, id);
                n += 1;
            }
        }
        n
    }

    /// Live flows of `owner` and a mark that changes whenever one of them has something
    /// acknowledged (the sum of their `snd_una`): how a draining owner shows progress. A
    /// scan of the arena: for control paths only.
    pub fn drain_progress(&self, owner: Owner) -> (usize, u64) {
        self.flows
            .iter()
            .filter(|f| f.has(fl::LIVE) && f.owner == owner)
            .fold((0, 0), |(n, m), f| (n + 1, m.wrapping_add(u64::from(f.snd_una))))
    }

    /// Closes every listener of `owner`.
    pub fn unlisten_owner(&mut self, owner: Owner) {
        let ports = &mut self.ports;
        let refs = &self.server_refs;
        self.listeners.retain(|port, o| {
            if *o == owner {
                if refs[usize::from(*port)] == 0 {
                    ports.release(*port);
                }
                false
            } else {
                true
            }
        });
    }

    /// Everything `owner` had goes: its flows are aborted (RST to peers) and its listeners
    /// closed. Returns the number of flows aborted.
    pub fn close_owner<E: Env>(&mut self, now: Instant, env: &mut E, owner: Owner) -> usize {
        let mut n = 0;
        for i in 0..self.flows.len() {
            let f = &self.flows[i];
            if f.has(fl::LIVE) && f.owner == owner {
                let id = self.id_of(i);
                let _ = self.abort(now, env, id);
                n += 1;
            }
        }
        self.unlisten_owner(owner);
        n
    }

    // ---------------------------------------------------------------------------------------
    // Input
    // ---------------------------------------------------------------------------------------

    /// Finds the flow of a tuple (local IP must be ours).
    pub fn lookup(&self, tuple: &FlowTuple) -> Option<FlowId> {
        if tuple.local_ip != self.local.ip {
            return None;
        }
        let k = key(u32::from(tuple.remote_ip), tuple.remote_port, tuple.local_port);
        let i = match self.last {
            Some((last, i)) if last == k => i,
            _ => *self.map.get(&k)?,
        };
        Some(self.id_of(i as usize))
    }

    /// The owner of a live flow.
    pub fn owner_of(&self, flow: FlowId) -> Option<Owner> {
        self.live(flow).map(|i| self.flows[i].owner)
    }

    /// Handles one received Machnet packet. Call [`flush`](Self::flush) after a burst.
    pub fn handle<E: Env>(&mut self, now: Instant, env: &mut E, pkt: &MachnetFrame<'_>) {
        self.handle_at(now, now, env, pkt)
    }

    /// Like [`handle`](Self::handle), for a packet that arrived at `rx_at` (the kernel's
    /// receive time, earlier than `now` if this shard was scheduled late). Round-trip samples
    /// then exclude the time the packet waited for the shard.
    pub fn handle_at<E: Env>(&mut self, now: Instant, rx_at: Instant, env: &mut E, pkt: &MachnetFrame<'_>) {
        let rx_at = rx_at.min(now);
        self.stats.rx_packets += 1;
        if pkt.dst_ip != self.local.ip {
            self.stats.rx_not_for_us += 1;
            return;
        }
        let k = key(u32::from(pkt.src_ip), pkt.src_port, pkt.dst_port);
        let found = match self.last {
            Some((last, i)) if last == k => Some(i),
            _ => {
                let i = self.map.get(&k).copied();
                if let Some(i) = i {
                    self.last = Some((k, i));
                }
                i
            }
        };
        if let Some(i) = found {
            let i = i as usize;
            let establishes = match pkt.hdr.packet_type {
                PacketType::Ack => true,
                PacketType::Data => self.flows[i].has(fl::PIGGY),
                _ => false,
            };
            if self.flows[i].has(fl::HALF_OPEN) && establishes && !self.group_has_room(self.flows[i].owner) {
                // This packet would establish the flow, but its owner's group filled up while
                // it was half-open: refuse it.
                self.stats.group_limited += 1;
                let id = self.id_of(i);
                let _ = self.abort(now, env, id);
                return;
            }
            let token = self.tokens[i];
            let mut cx = self.cx_at(i, env, now, rx_at);
            let v = cx.on_packet(&pkt.hdr, pkt.payload, pkt.src_mac, token);
            self.settle(i, v, env, now);
            return;
        }
        match pkt.hdr.packet_type {
            PacketType::Syn => match self.listeners.get(&pkt.dst_port).copied() {
                Some(owner) => {
                    let src = u32::from(pkt.src_ip);
                    if self.path_map.get(&src).is_some_and(|&p| {
                        self.paths[p as usize].half_open as usize >= self.cfg.max_half_open_per_source
                    }) {
                        self.stats.syn_source_limited += 1;
                        return;
                    }
                    let piggy = self.cfg.piggyback_acks
                        && pkt.hdr.timestamp != 0
                        && pkt.hdr.msg_flags.contains(MsgFlags::ACKS_IN_DATA);
                    let opts = CookieOpts { legacy: pkt.hdr.timestamp == 0, piggy };
                    self.open_passive(now, env, pkt, owner, &pkt.hdr, opts, true);
                }
                None => {
                    self.stats.syn_no_listener += 1;
                    self.reply_rst(env, pkt, 0, pkt.hdr.seqno.wrapping_add(1));
                }
            },
            PacketType::Ack => {
                // The final ACK of a handshake whose half-open flow a flood evicted: its
                // `ackno` is our cookie. Rebuild the flow and let the ACK establish it.
                if self.accept_by_cookie(now, rx_at, env, pkt, false) {
                    return;
                }
                // A peer still talking to a flow we no longer have: tell it.
                self.stats.rx_no_flow += 1;
                self.reply_rst(env, pkt, pkt.hdr.ackno, pkt.hdr.seqno);
            }
            PacketType::Data => {
                // A machnet-rs client's first DATA (ACKs in DATA negotiated) acknowledges our
                // ISN as its final ACK does: when that ACK was lost and a flood evicted the
                // half-open flow, the cookie rebuilds it, and the rebuilt flow answers the DATA
                // with its SYN-ACK again (DATA alone establishes nothing: `FlowCx::on_data`);
                // the client's ACK of it then establishes the flow and its DATA comes again.
                if self.accept_by_cookie(now, rx_at, env, pkt, true) {
                    return;
                }
                // Data for a flow we no longer have (its application died and the RST we sent
                // was lost, or this end restarted): without an answer the sender would retry
                // until its peer timeout. DATA carries no ackno to echo, so the RST
                // acknowledges the packet instead (ackno = its seqno + 1), which a machnet-rs
                // sender accepts as an answer to a packet it sent; an original ignores it.
                self.stats.rx_no_flow += 1;
                self.reply_rst(env, pkt, 0, pkt.hdr.seqno.wrapping_add(1));
            }
            _ => self.stats.rx_no_flow += 1,
        }
    }

    /// Opens a server flow for `pkt`'s connection to `owner`'s listener from `syn` (received,
    /// or rebuilt from a cookie), its ISN the cookie for `opts`; sends the SYN-ACK if
    /// `synack`. Returns the flow's index.
    #[allow(clippy::too_many_arguments)]
    fn open_passive<E: Env>(
        &mut self,
        now: Instant,
        env: &mut E,
        pkt: &MachnetFrame<'_>,
        owner: Owner,
        syn: &MachnetRepr,
        opts: CookieOpts,
        synack: bool,
    ) -> Option<usize> {
        if !self.group_has_room(owner) {
            self.stats.group_limited += 1;
            return None;
        }
        // Half-open flows have a budget; past it (or with the arena full) the oldest
        // half-open one makes room: never an established flow.
        if self.half_open_count >= self.cfg.max_half_open || self.free.is_empty() {
            self.evict_half_open(env, now);
        }
        let Some(i) = self.alloc_flow(owner, pkt.src_ip, pkt.src_mac, pkt.src_port, pkt.dst_port) else {
            self.stats.syn_table_full += 1;
            return None;
        };
        self.server_refs[usize::from(pkt.dst_port)] += 1;
        self.enter_half_open(i);
        let conn = self.conn(pkt, syn.seqno);
        if synack {
            // The connection has a half-open flow again (a retransmitted SYN): an earlier
            // eviction no longer lets a cookie rebuild it.
            self.evicted.take(now.as_nanos(), self.cookies.slot(conn));
        }
        let iss = self.cookies.isn(now.as_nanos(), conn, opts);
        let mut cx = self.cx(i, env, now);
        cx.start_accept(syn, iss, synack);
        self.settle(i, Verdict::Keep, env, now);
        Some(i)
    }

    /// The connection a cookie for `pkt`'s 4-tuple and the client ISN `client_isn` binds.
    fn conn(&self, pkt: &MachnetFrame<'_>, client_isn: u32) -> Conn {
        Conn {
            peer_ip: u32::from(pkt.src_ip),
            peer_port: pkt.src_port,
            local_ip: u32::from(self.local.ip),
            local_port: pkt.dst_port,
            client_isn,
        }
    }

    /// Rebuilds the flow of `pkt` (a final ACK, or a first DATA if `data`) from its cookie, if
    /// it proves one (see [`open_from_cookie`](Self::open_from_cookie)), and hands it the
    /// packet. False if it proves nothing.
    fn accept_by_cookie<E: Env>(
        &mut self,
        now: Instant,
        rx_at: Instant,
        env: &mut E,
        pkt: &MachnetFrame<'_>,
        data: bool,
    ) -> bool {
        let Some(i) = self.open_from_cookie(now, env, pkt, data) else { return false };
        self.stats.syn_cookies_accepted += 1;
        let token = self.tokens[i];
        let mut cx = self.cx_at(i, env, now, rx_at);
        let v = cx.on_packet(&pkt.hdr, pkt.payload, pkt.src_mac, token);
        self.settle(i, v, env, now);
        true
    }

    /// A flow rebuilt (half-open, its SYN-ACK not sent again) for an ACK with no flow whose
    /// `ackno` is a cookie of ours for its connection, whose half-open flow was evicted
    /// lately, to a port still listened on; or for the client's first DATA (`data`), whose
    /// `ackno` means something only when the handshake negotiated ACKs in DATA.
    fn open_from_cookie<E: Env>(
        &mut self,
        now: Instant,
        env: &mut E,
        pkt: &MachnetFrame<'_>,
        data: bool,
    ) -> Option<usize> {
        let owner = self.listeners.get(&pkt.dst_port).copied()?;
        // The final ACK (and the first DATA) carries the client's next sequence number and
        // acknowledges our ISN.
        let client_isn = pkt.hdr.seqno.wrapping_sub(1);
        let conn = self.conn(pkt, client_isn);
        let opts = self.cookies.check(now.as_nanos(), conn, pkt.hdr.ackno.wrapping_sub(1))?;
        if data && !opts.piggy {
            return None;
        }
        // Only a connection whose half-open flow was evicted (see `cookie::Evicted`).
        if !self.evicted.take(now.as_nanos(), self.cookies.slot(conn)) {
            return None;
        }
        let syn = MachnetRepr {
            msg_flags: if opts.piggy { MsgFlags::ACKS_IN_DATA } else { MsgFlags::empty() },
            // Any timestamp but 0 marks a machnet-rs peer.
            timestamp: u64::from(!opts.legacy),
            ..MachnetRepr::control(PacketType::Syn, client_isn, 0)
        };
        self.open_passive(now, env, pkt, owner, &syn, opts, false)
    }

    fn reply_rst<E: Env>(&mut self, env: &mut E, pkt: &MachnetFrame<'_>, seqno: u32, ackno: u32) {
        let frame = FrameRepr {
            src_mac: self.local.mac,
            dst_mac: pkt.src_mac,
            src_ip: self.local.ip,
            dst_ip: pkt.src_ip,
            src_port: pkt.dst_port,
            dst_port: pkt.src_port,
            hdr: MachnetRepr::control(PacketType::Rst, seqno, ackno),
        };
        if env.transmit(NO_OWNER, &frame, None) {
            self.stats.tx_rsts += 1;
        } else {
            self.stats.tx_no_buffer += 1;
        }
    }

    /// Does the work queued by packets, sends and closes: owed ACKs (one per flow per burst),
    /// transmissions the windows allow, and deliveries the application refused earlier.
    pub fn flush<E: Env>(&mut self, now: Instant, env: &mut E) {
        let n = self.work.len();
        for _ in 0..n {
            let Some(i) = self.work.pop_front() else { break };
            let i = i as usize;
            self.flows[i].clear(fl::IN_WORK);
            if !self.flows[i].has(fl::LIVE) {
                continue;
            }
            let mut cx = self.cx(i, env, now);
            let v = if cx.f.state == FlowState::PeerClosed {
                if cx.try_deliver() {
                    let tuple = cx.f.tuple(&cx.local);
                    Verdict::Free(Some(Event::PeerClosed { flow: cx.id, tuple }))
                } else {
                    Verdict::Keep
                }
            } else {
                if cx.f.has(fl::HAS_PENDING) {
                    cx.advance();
                }
                if cx.f.has(fl::PIGGY) {
                    // DATA leaving now carries the ACK; one still owed may wait for DATA.
                    cx.pump();
                    cx.ack_or_delay();
                } else {
                    cx.flush_ack();
                    cx.pump();
                }
                cx.close_if_drained()
            };
            if let Verdict::Free(ev) = v {
                self.free_flow(i, env, now, ev);
                continue;
            }
            let id = self.id_of(i);
            let f = &mut self.flows[i];
            let d = f.deadline();
            if d != 0 && (f.timer_at == 0 || d < f.timer_at) {
                f.timer_at = d;
                env.set_timer(id, Some(Instant(d)));
            }
            // Retry later only what could not be done now. A refused delivery waits for the
            // owner to make room (`on_writable`) instead of spinning here.
            if f.has(fl::BLOCKED) && !f.has(fl::PARKED) {
                f.set(fl::PARKED);
                self.blocked.push(i as u32);
            }
            // An ACK waiting for its delay has its timer; one that found no buffer retries.
            if (f.has(fl::ACK_PENDING) && f.ack_at == 0) || f.has(fl::TX_STALLED) {
                self.mark_work(i);
            }
        }
    }

    /// The owner can take messages again (its ring drained): flows whose deliveries it refused
    /// are retried at the next [`flush`](Self::flush).
    pub fn on_writable(&mut self, owner: Owner) {
        let mut k = 0;
        while k < self.blocked.len() {
            let i = self.blocked[k] as usize;
            let f = &self.flows[i];
            if !f.has(fl::LIVE) || !f.has(fl::PARKED) || f.owner == owner {
                self.blocked.swap_remove(k);
                let f = &mut self.flows[i];
                f.clear(fl::PARKED);
                if f.has(fl::LIVE) {
                    self.mark_work(i);
                }
            } else {
                k += 1;
            }
        }
    }

    /// True if some flow waits for its owner to make room.
    pub fn has_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// True if [`flush`](Self::flush) has work queued.
    pub fn has_work(&self) -> bool {
        !self.work.is_empty()
    }

    /// The flow's timer fired.
    pub fn on_timer<E: Env>(&mut self, now: Instant, env: &mut E, flow: FlowId) {
        let Some(i) = self.live(flow) else { return };
        let f = &mut self.flows[i];
        f.timer_at = 0;
        if f.ack_at != 0 && f.ack_at <= now.as_nanos() {
            // A delayed ACK's deadline: DATA queued meanwhile (and not sent yet: the
            // application's send and this timer fell into one pass) carries it; otherwise it
            // goes alone.
            let mut cx = self.cx(i, env, now);
            if cx.f.pend_count > 0 {
                cx.pump();
            }
            cx.ack_or_delay();
            let f = &mut self.flows[i];
            if f.has(fl::ACK_PENDING) {
                // No buffer: retried at the next flush.
                f.ack_at = 0;
                self.mark_work(i);
            }
        }
        let f = &mut self.flows[i];
        if f.rto_at == 0 || f.rto_at > now.as_nanos() {
            let d = f.deadline();
            if d != 0 {
                f.timer_at = d;
                env.set_timer(flow, Some(Instant(d)));
            }
            return;
        }
        let token = self.tokens[i];
        let mut cx = self.cx(i, env, now);
        let v = cx.on_timeout(token);
        if matches!(v, Verdict::Keep) && self.flows[i].state == FlowState::SynSent {
            // A SYN went unanswered: the peer's MAC may be wrong (it restarted with a new
            // one, or a forged ARP reply won); the owner of ARP hears of it.
            let ip = self.flows[i].remote_ip;
            if !self.unanswered.contains(&ip) && !self.unanswered.is_full() {
                self.unanswered.push(ip);
            }
        }
        self.settle(i, v, env, now);
    }

    /// True when a SYN went unanswered since the last [`take_unanswered`](Self::take_unanswered)
    /// (one load: poll loops ask this every turn).
    #[inline]
    pub fn has_unanswered(&self) -> bool {
        !self.unanswered.is_empty()
    }

    /// Remote IPs whose SYNs went unanswered since the last call (a connect timed out once):
    /// re-resolve their MACs, and report a change with
    /// [`update_peer_mac`](Self::update_peer_mac).
    pub fn take_unanswered(&mut self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.unanswered.drain(..).map(Ipv4Addr::from)
    }

    /// `ip` is now at `mac` (a reply to our own ARP request): connects to it still waiting
    /// for a SYN-ACK use the new MAC and send their SYN again at once. Established flows keep
    /// theirs. Returns how many flows changed. A scan of the arena: for ARP, not per packet.
    pub fn update_peer_mac<E: Env>(&mut self, now: Instant, env: &mut E, ip: Ipv4Addr, mac: EthernetAddress) -> usize {
        let ip = u32::from(ip);
        let mut n = 0;
        for i in 0..self.flows.len() {
            let f = &mut self.flows[i];
            if f.has(fl::LIVE) && f.state == FlowState::SynSent && f.remote_ip == ip && f.remote_mac != mac {
                f.remote_mac = mac;
                let mut cx = self.cx(i, env, now);
                cx.resend_syn();
                n += 1;
            }
        }
        n
    }

    // ---------------------------------------------------------------------------------------
    // Introspection
    // ---------------------------------------------------------------------------------------

    fn info(&self, i: usize) -> FlowInfo {
        let f = &self.flows[i];
        FlowInfo {
            id: self.id_of(i),
            tuple: f.tuple(&self.local),
            owner: f.owner,
            state: f.state,
            cwnd: f.cc.cwnd(),
            srtt: f.rtt.srtt(),
            min_rtt: f.rtt.min().unwrap_or_default(),
            in_flight: f.outstanding(),
            queued: f.pend_count,
            snd_una: f.snd_una,
            snd_nxt: f.snd_nxt,
            rcv_nxt: f.rcv_nxt,
            legacy_peer: f.has(fl::LEGACY),
            acks_in_data: f.has(fl::PIGGY),
            counters: self.counters[i],
        }
    }

    /// A snapshot of one flow.
    pub fn flow_info(&self, flow: FlowId) -> Option<FlowInfo> {
        self.live(flow).map(|i| self.info(i))
    }

    /// Snapshots of every live flow.
    pub fn flows(&self) -> impl Iterator<Item = FlowInfo> + '_ {
        (0..self.flows.len()).filter(|&i| self.flows[i].has(fl::LIVE)).map(|i| self.info(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_state_size() {
        // Per-flow state stays within four cache lines (the slot rings live in separate arrays).
        let size = core::mem::size_of::<Flow>();
        assert!(size <= 4 * 64, "Flow is {size} bytes");
        assert_eq!(core::mem::size_of::<TxSlot>(), 16);
        assert_eq!(core::mem::size_of::<RxSlot>(), 8);
    }
}
