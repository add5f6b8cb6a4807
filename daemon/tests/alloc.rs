//! A shard in steady state allocates nothing per message. Two shards run on this test's
//! thread (the counting allocator watches only it) over an in-memory port pair; applications
//! on other threads exchange request/response messages through real shared-memory channels.

use machnet::client::Channel;
use machnet::ctrl::AppId;
use machnet::engine::EngineChannel;
use machnet::layout::{ChannelConfig, MachnetFlow};
use machnet_daemon::arp::ArpConfig;
use machnet_daemon::mesh::Mesh;
use machnet_daemon::ports::SharedPorts;
use machnet_daemon::shard::{ChannelSlot, EngineShard, Reporting, ShardCmd, ShardSetup};
use machnet_net::port::mem::{pairs, MemConfig, MemPort};
use machnet_net::port::{Burst, Capabilities, PacketBuf, Port, PortStats};
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::wire::{classify, ChecksumCaps, EthernetAddress, Frame, MachnetRepr, PacketType};
use machnet_runtime::clock::Clock;
use machnet_runtime::idle::Parker;
use machnet_runtime::shard::{Pipeline, Recorder};
use machnet_transport::{Config, Endpoint, LocalAddr};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Round trips measured after the warm-up (any per-message allocation would count thousands).
const ROUND_TRIPS: u64 = 20_000;
const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

/// One daemon's shards, over one memory port each, sharing a port space and a hand-off mesh
/// (as `machnetd` wires them).
struct Side<P: Port = MemPort> {
    shards: Vec<EngineShard<P>>,
    cmds: Vec<mpsc::SyncSender<ShardCmd>>,
    reports: Vec<Arc<Reporting>>,
    _parkers: Vec<Parker>,
}

fn side<P: Port>(ports: Vec<P>, mac: EthernetAddress, ip: Ipv4Addr, peer: (Ipv4Addr, EthernetAddress)) -> Side<P> {
    let parkers: Vec<Parker> = ports.iter().map(|_| Parker::new().unwrap()).collect();
    let wakers: Vec<_> = parkers.iter().map(|p| p.waker()).collect();
    let meshes = Mesh::build(&wakers);
    let space = SharedPorts::new();
    // No channel closes in these tests; a closed one would be dropped by its shard.
    let (graveyard, _) = mpsc::sync_channel(1);
    let mut s = Side { shards: Vec::new(), cmds: Vec::new(), reports: Vec::new(), _parkers: Vec::new() };
    for (i, ((port, mesh), parker)) in ports.into_iter().zip(meshes).zip(&parkers).enumerate() {
        let mut endpoint =
            Endpoint::new(Config { max_flows: 64, ..Config::default() }, LocalAddr { mac, ip }, space.clone()).unwrap();
        endpoint.set_steering(None, i as u16);
        let (tx, rx) = mpsc::sync_channel(16);
        let report = Reporting::shared();
        s.shards.push(EngineShard::new(ShardSetup {
            index: i,
            port,
            endpoint,
            arp: (ArpConfig::default(), vec![peer]),
            rx_caps: ChecksumCaps::software(),
            cmds: rx,
            fds: parker.fd_set(),
            report: report.clone(),
            linger: Duration::from_millis(100),
            linger_max: Duration::from_millis(100),
            gone_linger: Duration::from_millis(100),
            mesh,
            graveyard: graveyard.clone(),
        }));
        s.cmds.push(tx);
        s.reports.push(report);
    }
    s._parkers = parkers;
    s
}

fn channel(id: u64, cmds: &mpsc::SyncSender<ShardCmd>) -> Channel {
    let cfg = ChannelConfig { tx_bufs: 1024, rx_bufs: 1024, tx_ring: 256, rx_ring: 256, ..ChannelConfig::DEFAULT };
    let (ch, fds) = EngineChannel::create(&cfg, &format!("alloc-test-{id}"), false).unwrap();
    cmds.send(ShardCmd::AddChannel(Box::new(ChannelSlot::new(id, AppId(id), ch)))).unwrap();
    Channel::from_fds(fds).unwrap()
}

/// Request/response between an application on shard `client_shard` of A and one listening on
/// shard `server_shard` of B, every shard polled by this thread; returns the allocations
/// counted over 20,000 round trips in steady state, and the two sides.
fn steady_state(shards: usize, client_shard: usize, server_shard: usize) -> (u64, Side, Side) {
    // One pair per queue: what shard i of A sends arrives at shard i of B (as memif's queues
    // do), so flows whose owners sit on different shards need the hand-off. The queues of a
    // side share their buffers, as a NIC's share its mempool: a frame handed from shard 0 to
    // shard 1 is freed by shard 1's queue.
    let (pas, pbs) = pairs(shards, MemConfig::default(), MAC_A, MAC_B);
    let mut a = side(pas, MAC_A, IP_A, (IP_B, MAC_B));
    let mut b = side(pbs, MAC_B, IP_B, (IP_A, MAC_A));
    let mut server = channel(1, &b.cmds[server_shard]);
    let mut client = channel(2, &a.cmds[client_shard]);
    let done = Arc::new(AtomicBool::new(false));
    let round_trips = Arc::new(AtomicU64::new(0));
    let (d1, d2, rt) = (done.clone(), done.clone(), round_trips.clone());
    let refused = Arc::new(AtomicU64::new(0));
    let refused_srv = refused.clone();
    let srv = std::thread::spawn(move || {
        server.listen(IP_B, 888).unwrap();
        let mut buf = [0u8; 2048];
        while !d1.load(Ordering::Relaxed) {
            if let Some((n, f)) = server.recv_blocking(&mut buf, Some(Duration::from_millis(50))).unwrap() {
                let back =
                    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port };
                while server.send(back, &buf[..n]).is_err() && !d1.load(Ordering::Relaxed) {
                    refused_srv.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                }
            }
        }
    });
    let cli = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let flow = client.connect(IP_A, IP_B, 888).unwrap();
        let msg = [0x42u8; 1000];
        let mut buf = [0u8; 2048];
        while !d2.load(Ordering::Relaxed) {
            while client.send(flow, &msg).is_err() {
                if d2.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::yield_now();
            }
            match client.recv_blocking(&mut buf, Some(Duration::from_secs(5))).unwrap() {
                Some((n, _)) => {
                    assert_eq!(&buf[..n], &msg[..]);
                    rt.fetch_add(1, Ordering::Relaxed);
                }
                None if !d2.load(Ordering::Relaxed) => {
                    eprintln!("client: no response within 5 s at {} round trips", rt.load(Ordering::Relaxed));
                }
                None => {}
            }
        }
    });
    let mut clock = Clock::new();
    let mut recs: Vec<Recorder> =
        (0..2 * shards).map(|_| Recorder::standalone(EngineShard::<MemPort>::STAGES.len())).collect();
    let mut poll_all = |a: &mut Side, b: &mut Side| {
        let now = clock.now();
        for (s, r) in a.shards.iter_mut().chain(b.shards.iter_mut()).zip(recs.iter_mut()) {
            s.poll(now, r);
        }
    };
    let mut run_until = |target: u64, a: &mut Side, b: &mut Side| {
        // Bounded by progress, not by total time: beside CPU hogs the three threads of this test
        // (pollers, client, server) each wait for a time slice per hop, and a round trip can
        // take tens of milliseconds; a minute without a single one means stuck.
        let (mut t, mut seen) = (Instant::now(), round_trips.load(Ordering::Relaxed));
        while seen < target {
            poll_all(a, b);
            let now = round_trips.load(Ordering::Relaxed);
            if now != seen {
                (t, seen) = (Instant::now(), now);
            }
            if t.elapsed() >= Duration::from_secs(60) {
                // Ask every shard for its flow list, let them publish it, and show it all.
                for r in a.reports.iter().chain(b.reports.iter()) {
                    if let Ok(mut rep) = r.report.lock() {
                        rep.detail_wanted = rep.detail.seq + 1;
                    }
                    r.asked.store(true, Ordering::Relaxed);
                }
                for _ in 0..1000 {
                    poll_all(a, b);
                }
                let counters = |s: &Side| {
                    (0..s.reports.len())
                        .map(|i| {
                            let r = s.reports[i].snapshot();
                            format!("{:?}\n{:?}\n{:#?}", r.counters, r.endpoint, r.detail.flows)
                        })
                        .collect::<Vec<_>>()
                };
                panic!(
                    "no round trip for 60 s: stuck at {seen} of {target}; server send refusals {}; A {:#?} B {:#?}",
                    refused.load(Ordering::Relaxed),
                    counters(a),
                    counters(b)
                );
            }
        }
    };
    // Warm-up: adopt the channels, connect, grow whatever grows once.
    run_until(2000, &mut a, &mut b);
    let before = round_trips.load(Ordering::Relaxed);
    // Positive control: the counter sees this thread.
    assert_eq!(count_allocs(|| std::hint::black_box(vec![1u8; 3])).0, 1);
    let (allocs, ()) = count_allocs(|| run_until(before + ROUND_TRIPS, &mut a, &mut b));
    done.store(true, Ordering::Relaxed);
    // Keep polling so the applications can finish their last calls (and reports refresh).
    let t = Instant::now();
    while !(srv.is_finished() && cli.is_finished()) && t.elapsed() < Duration::from_secs(10) {
        poll_all(&mut a, &mut b);
    }
    // Their every wait is bounded (5 s receives, the done flag): not finished means stuck.
    assert!(srv.is_finished() && cli.is_finished(), "the application threads did not finish within 10 s");
    srv.join().unwrap();
    cli.join().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(30) {
        poll_all(&mut a, &mut b);
    }
    (allocs, a, b)
}

#[test]
fn shard_steady_state_allocates_nothing() {
    let (allocs, _a, _b) = steady_state(1, 0, 0);
    assert_eq!(allocs, 0, "{allocs} allocations in {ROUND_TRIPS} round trips through two shards");
}

#[test]
fn hand_off_between_shards_allocates_nothing() {
    // The client's channel on A's shard 1, the listener on B's shard 0: every request lands on
    // B's shard 1 and every response on A's shard 0, and each is handed to its owner.
    let (allocs, a, b) = steady_state(2, 1, 0);
    assert_eq!(allocs, 0, "{allocs} allocations in {ROUND_TRIPS} round trips handed between shards");
    let r = |s: &Side, i: usize| s.reports[i].snapshot().counters;
    assert!(r(&b, 1).handoff_sent >= ROUND_TRIPS, "B shard 1 hands requests over: {:?}", r(&b, 1));
    assert!(r(&b, 0).handoff_received >= ROUND_TRIPS, "{:?}", r(&b, 0));
    assert!(r(&a, 0).handoff_sent >= ROUND_TRIPS, "A shard 0 hands responses over: {:?}", r(&a, 0));
    assert!(r(&a, 1).handoff_received >= ROUND_TRIPS, "{:?}", r(&a, 1));
    for s in [&a, &b] {
        for i in 0..2 {
            assert_eq!(r(s, i).handoff_dropped, 0);
        }
    }
}

/// What [`Slow`] saw.
#[derive(Default)]
struct Probe {
    /// Set by the test: the next `free` (of a received frame) sleeps for the delay.
    armed: AtomicBool,
    /// CLOCK_MONOTONIC (ns) when that sleep ended; 0 before.
    slept_until: AtomicU64,
    /// DATA frames transmitted since the sleep ended.
    data_after: AtomicU64,
    /// How far before `slept_until` the earliest send time those frames carry lies (ns; 0:
    /// none before it).
    earliest_before_ns: AtomicU64,
    /// DATA frames transmitted in all.
    data_sent: AtomicU64,
}

/// A port that stalls once, in the receive stage (the first buffer freed after the test arms
/// it), and reads the send time out of every DATA frame it transmits.
struct Slow {
    inner: MemPort,
    probe: Arc<Probe>,
    delay: Duration,
}

impl Port for Slow {
    type Buf = <MemPort as Port>::Buf;
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    fn alloc(&mut self) -> Option<Self::Buf> {
        self.inner.alloc()
    }
    fn free(&mut self, buf: Self::Buf) {
        if self.probe.armed.swap(false, Ordering::Relaxed) {
            std::thread::sleep(self.delay);
            self.probe.slept_until.store(machnet_runtime::clock::monotonic_ns(), Ordering::Relaxed);
        }
        self.inner.free(buf)
    }
    fn rx_burst(&mut self, out: &mut Burst<Self::Buf>) -> usize {
        self.inner.rx_burst(out)
    }
    fn tx_burst(&mut self, pkts: &mut Burst<Self::Buf>) -> usize {
        let until = self.probe.slept_until.load(Ordering::Relaxed);
        for b in pkts.iter() {
            let Ok(Frame::Machnet(m)) = classify(b.frame(), ChecksumCaps::default()) else { continue };
            let hdr = m.hdr;
            if hdr.packet_type != PacketType::Data {
                continue;
            }
            self.probe.data_sent.fetch_add(1, Ordering::Relaxed);
            if until == 0 {
                continue;
            }
            // Between two machnet-rs endpoints (the default configuration) DATA carries the send
            // time in the high half of a split timestamp.
            let sent = if Config::default().piggyback_acks {
                MachnetRepr::unsplit_timestamp(hdr.timestamp).0
            } else {
                hdr.timestamp as u32
            };
            let before = i64::from((until as u32).wrapping_sub(sent) as i32).max(0) as u64;
            self.probe.data_after.fetch_add(1, Ordering::Relaxed);
            self.probe.earliest_before_ns.fetch_max(before, Ordering::Relaxed);
        }
        self.inner.tx_burst(pkts)
    }
    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
}

/// What a shard's turn sends after a long receive stage (here: DATA that the ACKs it read let
/// go) carries the time it leaves, not the turn's start. Stamped at the start, every round
/// trip those packets give is long by the whole stage, and Swift and the RTO take the shard's
/// own processing for delay on the path (the embedded stack's version of this:
/// `frames_sent_after_a_long_receive_stage_are_stamped_after_it` in tests/embedded.rs).
#[test]
fn what_a_shard_sends_after_a_long_receive_stage_is_stamped_when_it_leaves() {
    const DELAY: Duration = Duration::from_millis(200);
    const MSG: usize = 256 << 10;
    let probe = Arc::new(Probe::default());
    let (pas, pbs) = pairs(1, MemConfig::default(), MAC_A, MAC_B);
    let pas = pas.into_iter().map(|p| Slow { inner: p, probe: probe.clone(), delay: DELAY }).collect();
    let mut a = side(pas, MAC_A, IP_A, (IP_B, MAC_B));
    let mut b = side(pbs, MAC_B, IP_B, (IP_A, MAC_A));
    let mut server = channel(11, &b.cmds[0]);
    let mut client = channel(12, &a.cmds[0]);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let srv = std::thread::spawn(move || {
        server.listen(IP_B, 888).unwrap();
        let mut buf = vec![0u8; MSG];
        while !d.load(Ordering::Relaxed) {
            if let Some((n, _)) = server.recv_blocking(&mut buf, Some(Duration::from_millis(50))).unwrap() {
                return Some(n);
            }
        }
        None
    });
    let cli = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let flow = client.connect(IP_A, IP_B, 888).unwrap();
        // More than a window: the first flight leaves at once, the rest as ACKs come back.
        client.send(flow, &vec![7u8; MSG]).unwrap();
        client
    });
    let clock = Clock::new();
    a.shards[0].start(&clock);
    b.shards[0].start(&clock);
    let mut clock = clock;
    let mut ra = Recorder::standalone(EngineShard::<Slow>::STAGES.len());
    let mut rb = Recorder::standalone(EngineShard::<MemPort>::STAGES.len());
    let t = Instant::now();
    // Until A has sent its first flight.
    while probe.data_sent.load(Ordering::Relaxed) == 0 {
        a.shards[0].poll(clock.now(), &mut ra);
        b.shards[0].poll(clock.now(), &mut rb);
        assert!(t.elapsed() < Duration::from_secs(30), "A never sent DATA (connect or send stuck)");
    }
    // B alone for a while: it reads the flight and acknowledges it; the ACKs wait in A's ring.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(20) {
        b.shards[0].poll(clock.now(), &mut rb);
    }
    let sent_before = probe.data_sent.load(Ordering::Relaxed);
    // A's next turn: its receive stage stalls for DELAY on the first ACK, then the ACKs let
    // more of the message go.
    probe.armed.store(true, Ordering::Relaxed);
    a.shards[0].poll(clock.now(), &mut ra);
    assert!(!probe.armed.load(Ordering::Relaxed), "the slow receive stage ran");
    let after = probe.data_after.load(Ordering::Relaxed);
    assert!(
        after > 0,
        "the ACKs let nothing go in that turn ({sent_before} DATA frames before): the test shows nothing"
    );
    let early = Duration::from_nanos(probe.earliest_before_ns.load(Ordering::Relaxed));
    // Stamped at the turn's start, they are DELAY early; stamped when they leave, not at all
    // (the shard's clock and CLOCK_MONOTONIC agree within microseconds).
    assert!(
        early < DELAY / 4,
        "{after} DATA frames sent after a {DELAY:?} receive stage were stamped {early:?} before it ended"
    );
    // And the message still arrives whole.
    let t = Instant::now();
    while !srv.is_finished() {
        a.shards[0].poll(clock.now(), &mut ra);
        b.shards[0].poll(clock.now(), &mut rb);
        if t.elapsed() >= Duration::from_secs(30) {
            done.store(true, Ordering::Relaxed);
        }
    }
    assert_eq!(srv.join().unwrap(), Some(MSG), "the message did not arrive within 30 s");
    let t = Instant::now();
    while !cli.is_finished() && t.elapsed() < Duration::from_secs(10) {
        a.shards[0].poll(clock.now(), &mut ra);
        b.shards[0].poll(clock.now(), &mut rb);
    }
    assert!(cli.is_finished(), "the client's connect and send did not finish");
    drop(cli.join().unwrap());
}
