//! A shard in steady state allocates nothing per message. Two shards run on this test's
//! thread (the counting allocator watches only it) over an in-memory port pair; applications
//! on other threads exchange request/response messages through real shared-memory channels.

use machnet::client::Channel;
use machnet::ctrl::AppId;
use machnet::engine::EngineChannel;
use machnet::layout::{ChannelConfig, MachnetFlow};
use machnet_daemon::arp::ArpConfig;
use machnet_daemon::shard::{ChannelSlot, EngineShard, ShardCmd, ShardReport, ShardSetup};
use machnet_net::port::mem::{pair, MemConfig, MemPort};
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::wire::{ChecksumCaps, EthernetAddress};
use machnet_runtime::clock::Clock;
use machnet_runtime::idle::Parker;
use machnet_runtime::shard::{Pipeline, Recorder};
use machnet_transport::{Config, Endpoint, LocalAddr};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

fn shard(
    port: MemPort,
    mac: EthernetAddress,
    ip: Ipv4Addr,
    peer: (Ipv4Addr, EthernetAddress),
    parker: &Parker,
) -> (EngineShard<MemPort>, mpsc::SyncSender<ShardCmd>) {
    let endpoint =
        Endpoint::new(Config { max_flows: 64, ..Config::default() }, LocalAddr { mac, ip }, Endpoint::shared_ports())
            .unwrap();
    let (tx, rx) = mpsc::sync_channel(16);
    let s = EngineShard::new(ShardSetup {
        index: 0,
        port,
        endpoint,
        arp: (ArpConfig::default(), vec![peer]),
        rx_caps: ChecksumCaps::software(),
        cmds: rx,
        fds: parker.fd_set(),
        report: Arc::new(Mutex::new(ShardReport::default())),
        linger: Duration::from_millis(100),
    });
    (s, tx)
}

fn channel(id: u64, cmds: &mpsc::SyncSender<ShardCmd>) -> Channel {
    let cfg = ChannelConfig { tx_bufs: 1024, rx_bufs: 1024, tx_ring: 256, rx_ring: 256, ..ChannelConfig::DEFAULT };
    let (ch, fds) = EngineChannel::create(&cfg, &format!("alloc-test-{id}"), false).unwrap();
    cmds.send(ShardCmd::AddChannel(Box::new(ChannelSlot::new(id, AppId(id), ch)))).unwrap();
    Channel::from_fds(fds).unwrap()
}

#[test]
fn shard_steady_state_allocates_nothing() {
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let (parker_a, parker_b) = (Parker::new().unwrap(), Parker::new().unwrap());
    let (mut a, cmds_a) = shard(pa, MAC_A, IP_A, (IP_B, MAC_B), &parker_a);
    let (mut b, cmds_b) = shard(pb, MAC_B, IP_B, (IP_A, MAC_A), &parker_b);
    let mut server = channel(1, &cmds_b);
    let mut client = channel(2, &cmds_a);
    let done = Arc::new(AtomicBool::new(false));
    let round_trips = Arc::new(AtomicU64::new(0));
    let (d1, d2, rt) = (done.clone(), done.clone(), round_trips.clone());
    let srv = std::thread::spawn(move || {
        server.listen(IP_B, 888).unwrap();
        let mut buf = [0u8; 2048];
        while !d1.load(Ordering::Relaxed) {
            if let Some((n, f)) = server.recv_blocking(&mut buf, Some(Duration::from_millis(50))).unwrap() {
                let back =
                    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port };
                while server.send(back, &buf[..n]).is_err() {
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
                std::thread::yield_now();
            }
            if let Some((n, _)) = client.recv_blocking(&mut buf, Some(Duration::from_secs(5))).unwrap() {
                assert_eq!(&buf[..n], &msg[..]);
                rt.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut clock = Clock::new();
    let (mut ra, mut rb) = (
        Recorder::standalone(EngineShard::<MemPort>::STAGES.len()),
        Recorder::standalone(EngineShard::<MemPort>::STAGES.len()),
    );
    let mut run_until = |target: u64, a: &mut EngineShard<MemPort>, b: &mut EngineShard<MemPort>| {
        let t = Instant::now();
        while round_trips.load(Ordering::Relaxed) < target {
            let now = clock.now();
            a.poll(now, &mut ra);
            b.poll(now, &mut rb);
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "stuck at {} round trips",
                round_trips.load(Ordering::Relaxed)
            );
        }
    };
    // Warm-up: adopt the channels, connect, grow whatever grows once.
    run_until(2000, &mut a, &mut b);
    let before = round_trips.load(Ordering::Relaxed);
    // Positive control: the counter sees this thread.
    assert_eq!(count_allocs(|| std::hint::black_box(vec![1u8; 3])).0, 1);
    let (allocs, ()) = count_allocs(|| run_until(before + 20_000, &mut a, &mut b));
    done.store(true, Ordering::Relaxed);
    // Keep polling so the applications can finish their last calls.
    let t = Instant::now();
    while !(srv.is_finished() && cli.is_finished()) && t.elapsed() < Duration::from_secs(10) {
        let now = clock.now();
        a.poll(now, &mut ra);
        b.poll(now, &mut rb);
    }
    srv.join().unwrap();
    cli.join().unwrap();
    assert_eq!(allocs, 0, "{allocs} allocations in 20000 round trips through two shards");
    drop((cmds_a, cmds_b));
}
