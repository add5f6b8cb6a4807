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
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::wire::{ChecksumCaps, EthernetAddress};
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
struct Side {
    shards: Vec<EngineShard<MemPort>>,
    cmds: Vec<mpsc::SyncSender<ShardCmd>>,
    reports: Vec<Arc<Reporting>>,
    _parkers: Vec<Parker>,
}

fn side(ports: Vec<MemPort>, mac: EthernetAddress, ip: Ipv4Addr, peer: (Ipv4Addr, EthernetAddress)) -> Side {
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
