//! Shard scaling: aggregate messages per second of one daemon's engine with 1 and 2 shards.
//!
//! Daemon A has N shards (`EngineShard`, as `machnetd` wires them: one shared port space, a
//! hand-off mesh), peer daemon B likewise; A's shard *i* and B's shard *i* are joined by an
//! in-memory port pair (as memif joins queue *i* to queue *i*). Each lane *i* is one thread,
//! pinned to CPU *i*, that polls A's shard *i*, B's shard *i*, and two applications on real
//! shared-memory channels: a client on A's shard *i* with `--flows` flows to a listener on B's
//! shard *i* (port 888 + *i*, so no frame needs a hand-off), each flow keeping `--window`
//! requests of `--size` bytes outstanding, and the listener echoing every request. A lane holds
//! a whole request/response path on one core (the peer's share of the work included), so N
//! lanes on N cores show how the engine scales with shards: lanes share only the port space
//! (locked at connect) and the machine.
//!
//! Messages per second = 2 × round trips per second (a request and a response each). Runs of
//! different shard counts are interleaved; the report gives median, min and max per count and
//! the ratio of medians.
//!
//! `cargo run --release -p machnet-bench --bin shard_scaling [-- --shards 1,2 --runs 3 --seconds 3]`

use clap::Parser;
use machnet::client::{Channel, Error as ClientError};
use machnet::ctrl::AppId;
use machnet::engine::EngineChannel;
use machnet::layout::{ChannelConfig, MachnetFlow};
use machnet_bench::machine_summary;
use machnet_daemon::arp::ArpConfig;
use machnet_daemon::mesh::Mesh;
use machnet_daemon::ports::SharedPorts;
use machnet_daemon::shard::{ChannelSlot, EngineShard, Reporting, ShardCmd, ShardSetup};
use machnet_net::port::mem::{pair, MemConfig, MemPort};
use machnet_net::wire::{ChecksumCaps, EthernetAddress};
use machnet_runtime::clock::Clock;
use machnet_runtime::idle::Parker;
use machnet_runtime::shard::{Pipeline, Recorder};
use machnet_transport::{Config, Endpoint, LocalAddr};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
/// Listener port of lane 0 (lane i listens on BASE_PORT + i).
const BASE_PORT: u16 = 888;

/// Aggregate messages per second of one daemon's shards (in-process, over memory ports).
#[derive(Parser, Debug)]
struct Args {
    /// Shard counts to measure, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    shards: Vec<usize>,
    /// Runs per shard count (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured seconds per run (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Message size, bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Flows per lane.
    #[arg(long, default_value_t = 8)]
    flows: usize,
    /// Requests outstanding per flow.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Do not pin lane i to CPU i.
    #[arg(long)]
    no_pin: bool,
}

/// One daemon's shards over one memory port each, sharing a port space and a mesh.
struct Side {
    shards: Vec<EngineShard<MemPort>>,
    cmds: Vec<mpsc::SyncSender<ShardCmd>>,
    _parkers: Vec<Parker>,
}

fn side(ports: Vec<MemPort>, mac: EthernetAddress, ip: Ipv4Addr, peer: (Ipv4Addr, EthernetAddress)) -> Side {
    let parkers: Vec<Parker> = ports.iter().map(|_| Parker::new().expect("an eventfd")).collect();
    let wakers: Vec<_> = parkers.iter().map(|p| p.waker()).collect();
    let space = SharedPorts::new();
    let (graveyard, _) = mpsc::sync_channel(1);
    let mut s = Side { shards: Vec::new(), cmds: Vec::new(), _parkers: Vec::new() };
    for (i, ((port, mesh), parker)) in ports.into_iter().zip(Mesh::build(&wakers)).zip(&parkers).enumerate() {
        let mut endpoint =
            Endpoint::new(Config { max_flows: 256, ..Config::default() }, LocalAddr { mac, ip }, space.clone())
                .expect("transport configuration");
        endpoint.set_steering(None, i as u16);
        let (tx, rx) = mpsc::sync_channel(16);
        s.shards.push(EngineShard::new(ShardSetup {
            index: i,
            port,
            endpoint,
            arp: (ArpConfig::default(), vec![peer]),
            rx_caps: ChecksumCaps::software(),
            cmds: rx,
            fds: parker.fd_set(),
            report: Reporting::shared(),
            linger: Duration::from_millis(100),
            linger_max: Duration::from_millis(100),
            gone_linger: Duration::from_millis(100),
            mesh,
            graveyard: graveyard.clone(),
        }));
        s.cmds.push(tx);
    }
    s._parkers = parkers;
    s
}

fn channel(id: u64, cmds: &mpsc::SyncSender<ShardCmd>) -> Channel {
    let cfg = ChannelConfig { tx_bufs: 4096, rx_bufs: 4096, tx_ring: 1024, rx_ring: 1024, ..ChannelConfig::DEFAULT };
    let (ch, fds) = EngineChannel::create(&cfg, &format!("shard-scaling-{id}"), false).expect("a channel");
    cmds.send(ShardCmd::AddChannel(Box::new(ChannelSlot::new(id, AppId(id), ch)))).expect("the shard's queue");
    Channel::from_fds(fds).expect("the channel's memory")
}

fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

/// One lane's thread: its two shards and two applications, until `stop`; counts round trips.
#[allow(clippy::too_many_arguments)]
fn lane(
    lane: usize,
    mut a: EngineShard<MemPort>,
    mut b: EngineShard<MemPort>,
    client: Channel,
    server: Channel,
    args: &Args,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let (size, flows, window, pin) = (args.size, args.flows, args.window, !args.no_pin);
    std::thread::spawn(move || {
        if pin {
            core_affinity::set_for_current(core_affinity::CoreId { id: lane });
        }
        let mut clock = Clock::new();
        let (mut ra, mut rb) = (
            Recorder::standalone(EngineShard::<MemPort>::STAGES.len()),
            Recorder::standalone(EngineShard::<MemPort>::STAGES.len()),
        );
        let mut poll = |a: &mut EngineShard<MemPort>, b: &mut EngineShard<MemPort>| {
            let now = clock.now();
            a.poll(now, &mut ra);
            b.poll(now, &mut rb);
        };
        // Set-up (listen and connects block until the shards answer): on a helper thread while
        // this one polls.
        let port = BASE_PORT + lane as u16;
        let setup = std::thread::spawn(move || -> Result<_, String> {
            let (mut client, mut server) = (client, server);
            server.listen(IP_B, port).map_err(|e| format!("listen: {e}"))?;
            let fs: Vec<MachnetFlow> = (0..flows)
                .map(|_| client.connect(IP_A, IP_B, port).map_err(|e| format!("connect: {e}")))
                .collect::<Result<_, _>>()?;
            Ok((client, server, fs))
        });
        let t = Instant::now();
        while !setup.is_finished() {
            poll(&mut a, &mut b);
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("lane {lane}: set-up not done in 20 s"));
            }
        }
        let (mut client, mut server, fs) = setup.join().map_err(|_| "set-up panicked".to_string())??;
        let msg = vec![0x5au8; size];
        let mut buf = vec![0u8; size.max(64) + 1];
        let mut outstanding = vec![0usize; flows];
        let index: std::collections::HashMap<u16, usize> =
            fs.iter().enumerate().map(|(i, f)| (f.src_port, i)).collect();
        // An echo the server's ring refused, offered again next turn.
        let mut pending: Option<(MachnetFlow, usize)> = None;
        let mut echo_buf = vec![0u8; size.max(64) + 1];
        while !stop.load(Ordering::Relaxed) {
            poll(&mut a, &mut b);
            // Server: echo everything.
            loop {
                if let Some((f, n)) = pending {
                    match server.send(f, &echo_buf[..n]) {
                        Ok(()) => pending = None,
                        Err(ClientError::RingFull | ClientError::NoBuffers) => break,
                        Err(e) => return Err(format!("lane {lane}: echo: {e}")),
                    }
                }
                match server.recv(&mut echo_buf) {
                    Ok(Some((n, from))) => pending = Some((reverse(from), n)),
                    Ok(None) => break,
                    Err(e) => return Err(format!("lane {lane}: server receive: {e}")),
                }
            }
            // Client: collect responses, keep every flow's window full.
            loop {
                match client.recv(&mut buf) {
                    Ok(Some((_, from))) => {
                        if let Some(&i) = index.get(&from.dst_port) {
                            outstanding[i] -= 1;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(format!("lane {lane}: client receive: {e}")),
                }
            }
            'fill: for (i, f) in fs.iter().enumerate() {
                while outstanding[i] < window {
                    match client.send(*f, &msg) {
                        Ok(()) => outstanding[i] += 1,
                        Err(ClientError::RingFull | ClientError::NoBuffers) => break 'fill,
                        Err(e) => return Err(format!("lane {lane}: send: {e}")),
                    }
                }
            }
        }
        Ok(())
    })
}

/// One run with `n` shards: messages per second over `seconds`.
fn run(n: usize, args: &Args) -> Result<f64, String> {
    let (mut pas, mut pbs) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
        pas.push(pa);
        pbs.push(pb);
    }
    let a = side(pas, MAC_A, IP_A, (IP_B, MAC_B));
    let b = side(pbs, MAC_B, IP_B, (IP_A, MAC_A));
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut lanes = Vec::new();
    let (a_cmds, b_cmds) = (a.cmds, b.cmds);
    for (i, (sa, sb)) in a.shards.into_iter().zip(b.shards).enumerate() {
        let server = channel(100 + i as u64, &b_cmds[i]);
        let client = channel(200 + i as u64, &a_cmds[i]);
        lanes.push(lane(i, sa, sb, client, server, args, stop.clone(), counters[i].clone()));
    }
    let total = || counters.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    // Warm-up (set-up included), then the measurement.
    let t = Instant::now();
    while total() == 0 && t.elapsed() < Duration::from_secs(20) && !lanes.iter().any(|l| l.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (total(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let (c1, t1) = (total(), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for l in lanes {
        l.join().map_err(|_| "a lane panicked".to_string())??;
    }
    drop((a_cmds, b_cmds, a._parkers, b._parkers));
    if c1 == c0 {
        return Err(format!("{n} shard(s): no round trip completed"));
    }
    Ok(2.0 * (c1 - c0) as f64 / (t1 - t0).as_secs_f64())
}

fn main() {
    let args = Args::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# shard scaling: {}", machine_summary());
    println!(
        "# lanes: A shard i + B shard i + client and echo applications on one thread pinned to CPU i; {} B messages, {} flows x window {} per lane, {} s per run, {} runs interleaved; {cpus} CPUs",
        args.size, args.flows, args.window, args.seconds, args.runs
    );
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); args.shards.len()];
    for r in 0..args.runs {
        for (k, &n) in args.shards.iter().enumerate() {
            match run(n, &args) {
                Ok(rate) => {
                    println!("run {r}: {n} shard(s): {:.3} M messages/s", rate / 1e6);
                    results[k].push(rate);
                }
                Err(e) => {
                    eprintln!("shard_scaling: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    println!("\n| shards | median M msg/s | min | max | x 1 shard |\n|---:|---:|---:|---:|---:|");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = args.shards.iter().position(|&n| n == 1).map(|k| median(&mut results[k].clone()));
    for (k, &n) in args.shards.iter().enumerate() {
        let m = median(&mut results[k]);
        let ratio = base.map_or("-".to_string(), |b| format!("{:.2}", m / b));
        println!(
            "| {n} | {:.3} | {:.3} | {:.3} | {ratio} |",
            m / 1e6,
            results[k][0] / 1e6,
            results[k][results[k].len() - 1] / 1e6
        );
    }
}
