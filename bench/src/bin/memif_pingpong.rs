//! memif_pingpong: raw frames over DPDK's `net_memif` between two processes, no protocol: the
//! physical reference for the DPDK benchmarks.
//!
//! ```text
//! memif_pingpong --role server --socket /tmp/pp.sock [--cpu 0]
//! memif_pingpong --role client --socket /tmp/pp.sock [--cpu 1] [--size 64] [--window 1] [--seconds 5] [--json]
//! ```
//!
//! The server echoes every frame back. The client keeps `--window` frames in flight (1: one
//! at a time, a pure round-trip measurement), each carrying its send time (TSC), and records
//! every round trip in an HDR histogram; it reports RTT p50/p99/p99.9/max and round trips per
//! second (each one a frame each way). Start the server first (it removes a stale socket file);
//! each process busy-polls, so give each its own core (`--cpu`).
//!
//! Shutdown follows the memif rule (see `machnet_net::port::dpdk`): the client sends a last
//! frame; the server echoes it and stops polling; the client, once the echo is back, stops
//! polling, then stops and closes its port. The server then sees the link go down and does the
//! same. SIGINT/SIGTERM stop either side the same way.
//!
//! Build: `cargo build --release -p machnet-bench --features dpdk --bin memif_pingpong`.

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use machnet_net::port::dpdk::{
    memif_vdev, tsc_hz, tsc_now, unique_file_prefix, DeviceConfig, DeviceSpec, DpdkDevice, DpdkError, DpdkPort, Eal,
    EalArgs,
};
use machnet_net::port::{Burst, PacketBuf, Port};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Server,
    Client,
}

#[derive(Parser, Debug)]
#[command(name = "memif_pingpong", about = "Raw DPDK memif ping-pong: the physical reference")]
struct Args {
    /// Which side.
    #[arg(long, value_enum)]
    role: Role,
    /// memif socket file (no commas).
    #[arg(long)]
    socket: PathBuf,
    /// Frame size in bytes (60..=1514).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Frames in flight (client).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Measured seconds (client), after `--warmup`.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds (client).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// CPU of the polling thread (default: 0 for the server, 1 for the client).
    #[arg(long)]
    cpu: Option<u32>,
    /// Use reserved hugepages (`--in-memory`) instead of `--no-huge`.
    #[arg(long)]
    hugepages: bool,
    /// Print one JSON object with the results.
    #[arg(long)]
    json: bool,
}

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const KIND_DATA: u8 = 1;
const KIND_BYE: u8 = 2;
/// Ethernet header, kind, sequence number, send TSC.
const HDR: usize = 14 + 1 + 8 + 8;

#[derive(Serialize)]
struct Report {
    role: &'static str,
    size: usize,
    window: usize,
    seconds: f64,
    round_trips: u64,
    round_trips_per_s: f64,
    rtt_ns: Percentiles,
}

#[derive(Serialize)]
struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("memif_pingpong: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !(60..=1514).contains(&args.size) {
        return Err(format!("--size {} out of range 60..=1514", args.size));
    }
    if args.window == 0 || args.window > 4096 {
        return Err(format!("--window {} out of range 1..=4096", args.window));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| format!("signal handler: {e}"))?;
    }
    let server = args.role == Role::Server;
    if server {
        // A killed server leaves its socket file, and the next one would fail to bind.
        let _ = std::fs::remove_file(&args.socket);
    } else {
        // The client's start fails if the server's socket is not there yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !args.socket.exists() {
            if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                return Err(format!("no memif server socket at {}", args.socket.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let spec = DeviceSpec::parse(&memif_vdev(0, server, &args.socket));
    let cpu = args.cpu.unwrap_or(if server { 0 } else { 1 });
    let eal_args = EalArgs::new(&unique_file_prefix("memif-pingpong"))
        .main_lcore(cpu)
        .hugepages(args.hugepages)
        .device(&spec)
        .build();
    let eal = Eal::init(eal_args).map_err(|e| e.to_string())?;
    let dpdk = |e: DpdkError| e.to_string();
    let cfg = DeviceConfig { link_timeout: None, ..DeviceConfig::default() };
    let mut dev = DpdkDevice::open(&eal, &spec, &cfg).map_err(dpdk)?;
    wait_link(&dev, &stop)?;
    let mut port = dev.take_ports().pop().expect("one queue");

    let report = if server {
        serve(&mut port, &stop);
        None
    } else {
        Some(client(&mut port, args, &stop)?)
    };
    // Polling has stopped on this side (and, for the client, on the server's too).
    drop(port);
    if server {
        // Stop only after the client has (the link goes down when it stops its port).
        let deadline = Instant::now() + Duration::from_secs(2);
        while dev.link().map(|l| l.up).unwrap_or(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    dev.stop().map_err(dpdk)?;
    dev.close().map_err(dpdk)?;
    eal.shutdown().map_err(dpdk)?;
    if let Some(r) = report {
        print_report(&r, args.json);
    }
    Ok(())
}

fn wait_link(dev: &DpdkDevice, stop: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if dev.link().map_err(|e| e.to_string())?.up {
            return Ok(());
        }
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return Err("the memif link did not come up (is the other side running?)".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Echoes frames until the client's last frame (or a signal).
fn serve(port: &mut DpdkPort, stop: &AtomicBool) {
    let mut rx = Burst::new();
    let mut polls = 0u32;
    loop {
        port.rx_burst(&mut rx);
        let bye = rx.iter().any(|b| b.frame().get(14) == Some(&KIND_BYE));
        while !rx.is_empty() {
            port.tx_burst(&mut rx);
        }
        if bye {
            return;
        }
        polls = polls.wrapping_add(1);
        if polls % 1024 == 0 && stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

fn stamp(b: &mut impl PacketBuf, kind: u8, seq: u64) {
    let f = b.frame_mut();
    f[14] = kind;
    f[15..23].copy_from_slice(&seq.to_le_bytes());
    f[23..31].copy_from_slice(&tsc_now().to_le_bytes());
}

fn client(port: &mut DpdkPort, args: &Args, stop: &AtomicBool) -> Result<Report, String> {
    let hz = tsc_hz() as f64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let mut seq = 0u64;
    // Fill the window.
    let mut tx: Burst<_> = Burst::new();
    for _ in 0..args.window {
        let mut b = port.alloc().ok_or("mempool exhausted")?;
        let s = b.storage_mut();
        s[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        s[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        s[12..14].copy_from_slice(&ETHERTYPE);
        s[HDR..args.size].fill(0x5a);
        b.set_len(args.size);
        stamp(&mut b, KIND_DATA, seq);
        seq += 1;
        tx.push(b);
        if tx.is_full() {
            while !tx.is_empty() {
                port.tx_burst(&mut tx);
            }
        }
    }
    while !tx.is_empty() {
        port.tx_burst(&mut tx);
    }

    let start = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup);
    let end = warmup + Duration::from_secs_f64(args.seconds);
    let mut measuring = false;
    let mut measured_since = start;
    let mut rtts = 0u64;
    let mut rx = Burst::new();
    let mut polls = 0u32;
    let mut last_rx = Instant::now();
    loop {
        let n = port.rx_burst(&mut rx);
        if n > 0 {
            let now_tsc = tsc_now();
            for mut b in rx.drain(..) {
                let f = b.frame();
                if f.len() >= HDR && f[14] == KIND_DATA {
                    let sent = u64::from_le_bytes(f[23..31].try_into().expect("8 bytes"));
                    if measuring {
                        let ns = (now_tsc.wrapping_sub(sent) as f64 * 1e9 / hz) as u64;
                        let _ = hist.record(ns.max(1));
                        rtts += 1;
                    }
                }
                stamp(&mut b, KIND_DATA, seq);
                seq += 1;
                tx.push(b);
            }
            while !tx.is_empty() {
                port.tx_burst(&mut tx);
            }
            last_rx = Instant::now();
        }
        polls = polls.wrapping_add(1);
        if polls % 256 == 0 {
            let t = start.elapsed();
            if !measuring && t >= warmup {
                measuring = true;
                measured_since = Instant::now();
            }
            if t >= end || stop.load(Ordering::Relaxed) {
                break;
            }
            if last_rx.elapsed() > Duration::from_secs(2) {
                return Err("no frames from the server for 2 s".into());
            }
        }
    }
    let elapsed = measured_since.elapsed().as_secs_f64();
    say_bye(port);
    let q = |p: f64| hist.value_at_quantile(p);
    Ok(Report {
        role: "client",
        size: args.size,
        window: args.window,
        seconds: elapsed,
        round_trips: rtts,
        round_trips_per_s: rtts as f64 / elapsed,
        rtt_ns: Percentiles { p50: q(0.5), p99: q(0.99), p999: q(0.999), max: hist.max(), mean: hist.mean() },
    })
}

/// Drains the frames in flight, then sends the last frame until its echo is back (the server
/// no longer polls after echoing it), giving up after a second.
fn say_bye(port: &mut DpdkPort) {
    let mut rx = Burst::new();
    let start = Instant::now();
    // Let the window drain for 20 ms first, then send (and resend every 100 ms).
    let mut next_send = start + Duration::from_millis(20);
    while start.elapsed() < Duration::from_secs(1) {
        port.rx_burst(&mut rx);
        let mut back = false;
        for b in rx.drain(..) {
            back |= b.frame().get(14) == Some(&KIND_BYE);
            port.free(b);
        }
        if back {
            return;
        }
        if Instant::now() >= next_send {
            if let Some(mut b) = port.alloc() {
                let s = b.storage_mut();
                s[..64].fill(0);
                s[12..14].copy_from_slice(&ETHERTYPE);
                b.set_len(64);
                stamp(&mut b, KIND_BYE, u64::MAX);
                let mut tx = Burst::new();
                tx.push(b);
                port.tx_burst(&mut tx);
            }
            next_send = Instant::now() + Duration::from_millis(100);
        }
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("serialisable"));
        return;
    }
    println!(
        "memif raw ping-pong: size {} B, window {}: {:.0} round trips/s over {:.2} s ({} round trips); RTT ns \
         p50 {} p99 {} p99.9 {} max {} mean {:.0}",
        r.size,
        r.window,
        r.round_trips_per_s,
        r.seconds,
        r.round_trips,
        r.rtt_ns.p50,
        r.rtt_ns.p99,
        r.rtt_ns.p999,
        r.rtt_ns.max,
        r.rtt_ns.mean
    );
}
