//! Transport per core (scenario S4): two endpoints in one thread over the in-memory port,
//! one streaming messages to the other, the other acknowledging. Reports messages and packets
//! per second and ns per message, next to the raw port (frames moved with no protocol)
//! measured in the same run.
//!
//! `cargo run --release -p machnet-bench --bin transport_bench [-- --runs N --messages N]`

use machnet_bench::{machine_summary, Sample};
use machnet_net::port::mem::{pair, MemConfig, MemPort};
use machnet_net::port::{Burst, HeapBuf, PacketBuf, Port};
use machnet_net::time::Instant;
use machnet_net::wire::{classify, ChecksumCaps, EthernetAddress, Frame, FrameRepr, MsgFlags, FRAME_HEADER_LEN};
use machnet_transport::{
    Config, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, Seg,
};
use std::net::Ipv4Addr;
use std::time::Instant as WallClock;

const MSS: usize = 1418;

/// A minimal environment: a flat segment store, instant consumption on delivery.
struct BenchEnv {
    port: MemPort,
    caps: ChecksumCaps,
    txq: Burst<HeapBuf>,
    data: Vec<u8>,
    len: Vec<u16>,
    flags: Vec<u8>,
    next: Vec<Seg>,
    free: Vec<Seg>,
    timers: Vec<Option<(FlowId, Instant)>>,
    events: Vec<Event>,
    delivered: u64,
    frames: u64,
}

impl BenchEnv {
    fn new(port: MemPort, caps: ChecksumCaps, segs: usize) -> Self {
        BenchEnv {
            port,
            caps,
            txq: Burst::new(),
            data: vec![0; segs * MSS],
            len: vec![0; segs],
            flags: vec![0; segs],
            next: vec![Seg::MAX; segs],
            free: (0..segs as Seg).rev().collect(),
            timers: vec![None; 16],
            events: Vec::new(),
            delivered: 0,
            frames: 0,
        }
    }
    fn flush_tx(&mut self) {
        while !self.txq.is_empty() {
            if self.port.tx_burst(&mut self.txq) == 0 {
                break;
            }
        }
        for b in self.txq.drain(..) {
            self.port.free(b);
        }
    }
}

impl Env for BenchEnv {
    fn alloc_rx(&mut self, _o: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg> {
        let s = self.free.pop()?;
        let i = s as usize;
        self.data[i * MSS..i * MSS + payload.len()].copy_from_slice(payload);
        self.len[i] = payload.len() as u16;
        self.flags[i] = flags.bits();
        Some(s)
    }
    fn link_rx(&mut self, _o: Owner, prev: Seg, next: Seg) {
        self.next[prev as usize] = next;
    }
    fn free_rx(&mut self, _o: Owner, seg: Seg) {
        self.free.push(seg);
    }
    fn free_rx_chain(&mut self, o: Owner, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let n = self.next[s as usize];
            self.free_rx(o, s);
            s = n;
        }
    }
    fn deliver(&mut self, o: Owner, _f: FlowId, _t: &FlowTuple, msg: &InMsg) -> bool {
        // The application reads at once.
        self.delivered += 1;
        self.free_rx_chain(o, msg.head, msg.count);
        true
    }
    fn tx_meta(&self, _o: Owner, seg: Seg) -> (usize, MsgFlags) {
        (self.len[seg as usize] as usize, MsgFlags::from_bits_retain(self.flags[seg as usize]))
    }
    fn tx_next(&self, _o: Owner, seg: Seg) -> Option<Seg> {
        let n = self.next[seg as usize];
        (n != Seg::MAX).then_some(n)
    }
    fn tx_link(&mut self, _o: Owner, prev: Seg, next: Seg) {
        self.next[prev as usize] = next;
    }
    fn free_tx(&mut self, _o: Owner, seg: Seg) {
        self.free.push(seg);
    }
    fn transmit(&mut self, _o: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        let Some(mut buf) = self.port.alloc() else { return false };
        let n = match payload {
            Some(s) => {
                let i = s as usize;
                let n = self.len[i] as usize;
                buf.storage_mut()[FRAME_HEADER_LEN..FRAME_HEADER_LEN + n]
                    .copy_from_slice(&self.data[i * MSS..i * MSS + n]);
                n
            }
            None => 0,
        };
        let len = frame.emit(buf.storage_mut(), n, self.caps).expect("frame fits");
        buf.set_len(len);
        self.txq.push(buf);
        self.frames += 1;
        if self.txq.is_full() {
            self.flush_tx();
        }
        true
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timers[flow.index() as usize] = at.map(|t| (flow, t));
    }
    fn event(&mut self, _o: Owner, e: Event) {
        self.events.push(e);
    }
}

/// Fires the timers due at `now`.
fn fire(ep: &mut Endpoint, env: &mut BenchEnv, now: Instant) {
    for t in 0..env.timers.len() {
        if let Some((flow, at)) = env.timers[t] {
            if at <= now {
                env.timers[t] = None;
                ep.on_timer(now, env, flow);
            }
        }
    }
}

/// Queues one message of `size` bytes on `flow`.
fn send_msg(ep: &mut Endpoint, env: &mut BenchEnv, flow: FlowId, size: usize) {
    let segs = size.div_ceil(MSS);
    let mut head = Seg::MAX;
    let mut prev = Seg::MAX;
    for i in 0..segs {
        let s = env.free.pop().expect("segments");
        let n = (size - i * MSS).min(MSS);
        env.len[s as usize] = n as u16;
        env.flags[s as usize] = MsgFlags::for_fragment(i, segs).bits();
        env.next[s as usize] = Seg::MAX;
        if prev == Seg::MAX {
            head = s;
        } else {
            env.next[prev as usize] = s;
        }
        prev = s;
    }
    let msg = OutMsg { head, tail: prev, count: segs as u32, len: size as u32 };
    ep.send(env, flow, &msg).expect("send");
}

/// Request/response: A keeps `window` requests of `size` bytes outstanding, B answers each as
/// it is delivered (an echo server in the same pass), timers fire. `acks_in_data` off gives
/// the pure-ACK protocol (what an original peer gets) for the same-run comparison.
fn rpc(size: usize, rpcs: u64, window: u64, caps: ChecksumCaps, acks_in_data: bool) -> RpcResult {
    let mac_a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let mac_b = EthernetAddress([2, 0, 0, 0, 0, 2]);
    let (ip_a, ip_b) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let (pa, pb) =
        pair(MemConfig { buffers: 4096, queue_len: 4096, checksum: caps, ..MemConfig::default() }, mac_a, mac_b);
    let cfg = Config { max_flows: 16, piggyback_acks: acks_in_data, ..Config::default() };
    let mut a = Endpoint::new(cfg, LocalAddr { mac: mac_a, ip: ip_a }, LocalPorts::new()).unwrap();
    let mut b =
        Endpoint::new(Config { seed: 2, ..cfg }, LocalAddr { mac: mac_b, ip: ip_b }, LocalPorts::new()).unwrap();
    let mut ea = BenchEnv::new(pa, caps, 16_384);
    let mut eb = BenchEnv::new(pb, caps, 16_384);
    let mut rx = Burst::new();
    let mut now = Instant::from_micros(1);
    b.listen(1, 888).unwrap();
    let fa = a.connect(now, &mut ea, 1, ip_b, mac_b, 888, 0).unwrap();
    ea.flush_tx();
    let fb = loop {
        poll(&mut b, &mut eb, now, &mut rx);
        poll(&mut a, &mut ea, now, &mut rx);
        now = Instant(now.0 + 100);
        if let (false, Some(Event::Accepted { flow, .. })) = (ea.events.is_empty(), eb.events.first()) {
            break *flow;
        }
    };
    let (mut sent, mut answered) = (0u64, 0u64);
    let start = WallClock::now();
    let frames_before = ea.frames + eb.frames;
    while ea.delivered < rpcs {
        while sent < rpcs && sent - ea.delivered < window {
            send_msg(&mut a, &mut ea, fa, size);
            sent += 1;
        }
        a.flush(now, &mut ea);
        ea.flush_tx();
        poll(&mut b, &mut eb, now, &mut rx);
        while answered < eb.delivered {
            send_msg(&mut b, &mut eb, fb, size);
            answered += 1;
        }
        b.flush(now, &mut eb);
        eb.flush_tx();
        poll(&mut a, &mut ea, now, &mut rx);
        now = Instant(now.0 + 100);
        fire(&mut a, &mut ea, now);
        fire(&mut b, &mut eb, now);
    }
    let secs = start.elapsed().as_secs_f64();
    let frames = (ea.frames + eb.frames - frames_before) as f64;
    RpcResult {
        mrps: rpcs as f64 / secs / 1e6,
        ns_per_rpc: secs * 1e9 / rpcs as f64,
        frames_per_rpc: frames / rpcs as f64,
    }
}

struct RpcResult {
    mrps: f64,
    ns_per_rpc: f64,
    frames_per_rpc: f64,
}

/// Receives and handles everything queued at one side.
fn poll(ep: &mut Endpoint, env: &mut BenchEnv, now: Instant, rx: &mut Burst<HeapBuf>) -> usize {
    let mut n = 0;
    while env.port.rx_burst(rx) > 0 {
        for b in rx.drain(..) {
            if let Ok(Frame::Machnet(m)) = classify(b.frame(), env.caps) {
                ep.handle(now, env, &m);
            }
            env.port.free(b);
            n += 1;
        }
        ep.flush(now, env);
    }
    env.flush_tx();
    n
}

struct Result {
    ns_per_msg: f64,
    mpps: f64,
    mmsgs: f64,
}

/// Streams `messages` messages of `size` bytes from A to B with `inflight` messages queued.
fn stream(size: usize, messages: u64, inflight: u64, caps: ChecksumCaps) -> Result {
    let mac_a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let mac_b = EthernetAddress([2, 0, 0, 0, 0, 2]);
    let (ip_a, ip_b) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let (pa, pb) =
        pair(MemConfig { buffers: 4096, queue_len: 4096, checksum: caps, ..MemConfig::default() }, mac_a, mac_b);
    let cfg = Config { max_flows: 16, ..Config::default() };
    let mut a = Endpoint::new(cfg, LocalAddr { mac: mac_a, ip: ip_a }, LocalPorts::new()).unwrap();
    let mut b =
        Endpoint::new(Config { seed: 2, ..cfg }, LocalAddr { mac: mac_b, ip: ip_b }, LocalPorts::new()).unwrap();
    let mut ea = BenchEnv::new(pa, caps, 16_384);
    let mut eb = BenchEnv::new(pb, caps, 16_384);
    let mut rx = Burst::new();
    // Virtual time advances 100 ns per loop: timers stay quiet, RTT samples stay plausible.
    let mut now = Instant::from_micros(1);
    b.listen(1, 888).unwrap();
    let fa = a.connect(now, &mut ea, 1, ip_b, mac_b, 888, 0).unwrap();
    ea.flush_tx();
    while ea.events.is_empty() {
        poll(&mut b, &mut eb, now, &mut rx);
        poll(&mut a, &mut ea, now, &mut rx);
        now = Instant(now.0 + 100);
    }
    let mut sent = 0u64;
    let start = WallClock::now();
    let frames_before = ea.frames + eb.frames;
    while eb.delivered < messages {
        while sent < messages && sent - eb.delivered < inflight {
            send_msg(&mut a, &mut ea, fa, size);
            sent += 1;
        }
        a.flush(now, &mut ea);
        ea.flush_tx();
        poll(&mut b, &mut eb, now, &mut rx);
        poll(&mut a, &mut ea, now, &mut rx);
        now = Instant(now.0 + 100);
    }
    let secs = start.elapsed().as_secs_f64();
    let frames = (ea.frames + eb.frames - frames_before) as f64;
    Result { ns_per_msg: secs * 1e9 / messages as f64, mpps: frames / secs / 1e6, mmsgs: messages as f64 / secs / 1e6 }
}

/// The floor: frames of the same size moved through the same port pair with no protocol.
fn raw_port(frame_len: usize, frames: u64) -> f64 {
    let (mut a, mut b) = pair(MemConfig::default(), EthernetAddress::ZERO, EthernetAddress::ZERO);
    let mut burst = Burst::new();
    let mut rx = Burst::new();
    let start = WallClock::now();
    let mut moved = 0;
    while moved < frames {
        while !burst.is_full() {
            let mut f = a.alloc().unwrap();
            f.storage_mut()[..frame_len].fill(1);
            f.set_len(frame_len);
            burst.push(f);
        }
        a.tx_burst(&mut burst);
        b.rx_burst(&mut rx);
        for f in rx.drain(..) {
            moved += 1;
            b.free(f);
        }
    }
    moved as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> Sample {
    if v.is_empty() {
        return Sample { name: String::new(), median: 0.0, min: 0.0, max: 0.0 };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Sample { name: String::new(), median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "transport_bench",
    version,
    about = "Transport per core (S4): two endpoints in one thread over the in-memory port, next to the raw port"
)]
struct Args {
    /// Interleaved runs of every case (the median, min and max are reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Messages per run at 64 B (half as many at 1 KiB).
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(2..))]
    messages: u64,
    /// Skip the request/response cases (streams only, as before they existed).
    #[arg(long)]
    no_rpc: bool,
    /// Run only the stream cases whose name contains this (for profiling one case, e.g.
    /// `--only '1 KiB, software' --no-rpc --no-baseline`).
    #[arg(long)]
    only: Option<String>,
    /// Skip the raw port baselines (for profiling; the ratios column then reads 0).
    #[arg(long)]
    no_baseline: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let runs = args.runs as usize;
    let messages = args.messages;
    let offload = ChecksumCaps::tx_only().without_rx();
    let offload = ChecksumCaps { ipv4: offload.ipv4, udp: machnet_net::wire::Checksum::None, icmp: offload.icmp };
    println!("machine: {}", machine_summary());
    println!("runs: {runs} (interleaved), messages per run: {messages}\n");
    println!("| scenario | Mpps (median) | min | max | M msg/s | ns/msg | × raw port |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let cases: [(&str, usize, ChecksumCaps, u64); 4] = [
        ("64 B, checksums offloaded", 64, offload, messages),
        ("64 B, software checksums", 64, ChecksumCaps::software(), messages),
        ("1 KiB, checksums offloaded", 1024, offload, messages / 2),
        ("1 KiB, software checksums", 1024, ChecksumCaps::software(), messages / 2),
    ];
    let mut results: Vec<Vec<Result>> = (0..cases.len()).map(|_| Vec::new()).collect();
    let mut raw64 = Vec::new();
    let mut raw1k = Vec::new();
    let chosen = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));
    for _ in 0..runs {
        if !args.no_baseline {
            raw64.push(raw_port(160, messages));
            raw1k.push(raw_port(1120, messages / 2));
        }
        for (i, (name, size, caps, n)) in cases.iter().enumerate() {
            if chosen(name) {
                results[i].push(stream(*size, *n, 256, *caps));
            }
        }
    }
    let raw64 = median(raw64);
    let raw1k = median(raw1k);
    for (i, (name, size, _, _)) in cases.iter().enumerate() {
        let r = &results[i];
        if r.is_empty() {
            continue;
        }
        let pps = median(r.iter().map(|x| x.mpps).collect());
        let msgs = median(r.iter().map(|x| x.mmsgs).collect());
        let ns = median(r.iter().map(|x| x.ns_per_msg).collect());
        let raw = if *size == 64 { &raw64 } else { &raw1k };
        println!(
            "| transport {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} |",
            pps.median,
            pps.min,
            pps.max,
            msgs.median,
            ns.median,
            if raw.median > 0.0 { pps.median / raw.median } else { f64::NAN }
        );
    }
    if !args.no_baseline {
        println!(
            "| baseline: raw mem port, 160 B frames | {:.2} | {:.2} | {:.2} | | | 1.00 |",
            raw64.median, raw64.min, raw64.max
        );
        println!(
            "| baseline: raw mem port, 1120 B frames | {:.2} | {:.2} | {:.2} | | | 1.00 |",
            raw1k.median, raw1k.min, raw1k.max
        );
    }
    println!("\nMpps counts every frame both endpoints sent (DATA and ACKs); both endpoints share one core.");

    if args.no_rpc {
        return;
    }
    // Request/response, the same stack with and without ACKs in DATA, interleaved.
    let rpc_cases: [(&str, usize, u64, bool); 6] = [
        ("64 B, window 1, ACKs in DATA", 64, 1, true),
        ("64 B, window 1, pure ACKs", 64, 1, false),
        ("64 B, window 32, ACKs in DATA", 64, 32, true),
        ("64 B, window 32, pure ACKs", 64, 32, false),
        ("1 KiB, window 32, ACKs in DATA", 1024, 32, true),
        ("1 KiB, window 32, pure ACKs", 1024, 32, false),
    ];
    let mut rr: Vec<Vec<RpcResult>> = (0..rpc_cases.len()).map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, (_, size, window, piggy)) in rpc_cases.iter().enumerate() {
            let n = if *window == 1 { messages / 8 } else { messages / 2 };
            rr[i].push(rpc(*size, n, *window, ChecksumCaps::software(), *piggy));
        }
    }
    println!("\n| RPC, software checksums | M RPC/s (median) | min | max | ns/RPC | frames/RPC | × pure ACKs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, (name, _, _, piggy)) in rpc_cases.iter().enumerate() {
        let r = median(rr[i].iter().map(|x| x.mrps).collect());
        let ns = median(rr[i].iter().map(|x| x.ns_per_rpc).collect());
        let f = median(rr[i].iter().map(|x| x.frames_per_rpc).collect());
        let base = if *piggy { median(rr[i + 1].iter().map(|x| x.mrps).collect()).median } else { r.median };
        println!(
            "| rpc {name} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} |",
            r.median,
            r.min,
            r.max,
            ns.median,
            f.median,
            r.median / base
        );
    }
    println!("\nBoth endpoints (client and echo server) share one core; an RPC's ns cover both ends.");
}
