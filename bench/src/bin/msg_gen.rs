//! msg_gen: the request/response benchmark of the original Machnet, on the public client API.
//!
//! Server (no `--remote_ip`): listens on `--local_ip:--local_port` and answers every request
//! with a message of its own `--msg_size` whose first 8 bytes copy the request's (the window
//! slot). Client: connects to `--remote_ip:--remote_port`, keeps `--msg_window` requests
//! outstanding, records each round trip in an HDR histogram, and prints once per second
//!
//! `TX/RX (msg/sec, Gbps): (<tx>K/<rx>K, <txG>/<rxG>). RTT (p50/99/99.9 us): <p50>/<p99>/<p999>`
//!
//! and at exit (SIGINT, `--duration`, or `--msg_nr` responses)
//!
//! `Application Statistics (TOTAL) - [TX] Sent: <n> (<bytes> Bytes), Drops: <d>, [RX] Received: <m> (<bytes> Bytes)`
//!
//! Additions: `--msg_nr` is honoured, `--duration`, `--json` (one JSON object at exit with the
//! totals and whole-run percentiles), `--blocking` (sleep on the doorbell instead of spinning,
//! for machines with fewer cores than busy pollers).

use clap::Parser;
use hdrhistogram::Histogram;
use machnet::client::{Channel, Error, Machnet};
use machnet::layout::MachnetFlow;
use serde::Serialize;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "msg_gen", version, about = "Machnet request/response benchmark (the original's flags and output)")]
struct Args {
    /// Local IP (the local machnetd's address).
    #[arg(long = "local_ip")]
    local_ip: Ipv4Addr,
    /// Remote IP; empty (the default) runs the server.
    #[arg(long = "remote_ip", default_value = "")]
    remote_ip: String,
    /// Remote port.
    #[arg(long = "remote_port", default_value_t = 888)]
    remote_port: u16,
    /// Local port (the server listens on it).
    #[arg(long = "local_port", default_value_t = 888)]
    local_port: u16,
    /// Message size in bytes (> 8: the first 8 carry the window slot).
    #[arg(long = "msg_size", default_value_t = 64)]
    msg_size: usize,
    /// Requests kept outstanding (client).
    #[arg(long = "msg_window", default_value_t = 8)]
    msg_window: u64,
    /// Stop after this many responses (client) or requests (server).
    #[arg(long = "msg_nr", default_value_t = u64::MAX)]
    msg_nr: u64,
    /// Check every response's content.
    #[arg(long)]
    verify: bool,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Print one JSON object with the results at exit.
    #[arg(long)]
    json: bool,
    /// Wait on the doorbell when idle instead of spinning.
    #[arg(long)]
    blocking: bool,
}

#[derive(Default, Serialize)]
struct Totals {
    role: &'static str,
    msg_size: usize,
    msg_window: u64,
    seconds: f64,
    tx_msgs: u64,
    tx_bytes: u64,
    tx_drops: u64,
    rx_msgs: u64,
    rx_bytes: u64,
    rps: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    rtt_p999_us: f64,
    rtt_max_us: f64,
    rtt_samples: u64,
}

fn pattern_byte(i: usize) -> u8 {
    (i % 256) as u8
}

fn fill(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate().skip(8) {
        *b = pattern_byte(i);
    }
}

fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

fn main() {
    let args = Args::parse();
    if args.msg_size <= 8 {
        eprintln!("msg_gen: --msg_size must be greater than 8");
        std::process::exit(2);
    }
    let remote = if args.remote_ip.is_empty() {
        None
    } else {
        match args.remote_ip.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                eprintln!("msg_gen: --remote_ip {:?} is not an IPv4 address", args.remote_ip);
                std::process::exit(2);
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let result = (|| -> Result<Totals, Error> {
        let machnet = Machnet::init()?;
        let mut ch = machnet.attach()?;
        let t = match remote {
            None => server(&args, &mut ch, &stop)?,
            Some(ip) => client(&args, &mut ch, ip, &stop)?,
        };
        // Let the last replies leave before the channel goes.
        std::thread::sleep(Duration::from_millis(20));
        Ok(t)
    })();
    match result {
        Ok(t) => {
            println!(
                "Application Statistics (TOTAL) - [TX] Sent: {} ({} Bytes), Drops: {}, [RX] Received: {} ({} Bytes)",
                t.tx_msgs, t.tx_bytes, t.tx_drops, t.rx_msgs, t.rx_bytes
            );
            if args.json {
                println!("{}", serde_json::to_string(&t).expect("serialisable"));
            }
        }
        Err(e) => {
            eprintln!("msg_gen: {e}");
            std::process::exit(1);
        }
    }
}

fn recv(args: &Args, ch: &mut Channel, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, Error> {
    if args.blocking {
        ch.recv_blocking(buf, Some(Duration::from_millis(100)))
    } else {
        ch.recv(buf)
    }
}

fn finished(args: &Args, start: Instant, stop: &AtomicBool, n: u64) -> bool {
    stop.load(Ordering::Relaxed)
        || n >= args.msg_nr
        || args.duration.is_some_and(|d| start.elapsed().as_secs_f64() >= d)
}

fn server(args: &Args, ch: &mut Channel, stop: &AtomicBool) -> Result<Totals, Error> {
    ch.listen(args.local_ip, args.local_port)?;
    eprintln!("msg_gen server: listening on {}:{}", args.local_ip, args.local_port);
    let mut inb = vec![0u8; 8 << 20];
    let mut out = vec![0u8; args.msg_size];
    fill(&mut out);
    let mut t = Totals { role: "server", msg_size: args.msg_size, ..Totals::default() };
    let start = Instant::now();
    while !finished(args, start, stop, t.rx_msgs) {
        if let Some((n, flow)) = recv(args, ch, &mut inb)? {
            t.rx_msgs += 1;
            t.rx_bytes += n as u64;
            out[..8.min(n)].copy_from_slice(&inb[..8.min(n)]);
            loop {
                match ch.send(reverse(flow), &out) {
                    Ok(()) => break,
                    Err(Error::RingFull) | Err(Error::NoBuffers) => {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::hint::spin_loop()
                    }
                    Err(e) => return Err(e),
                }
            }
            t.tx_msgs += 1;
            t.tx_bytes += out.len() as u64;
        }
    }
    t.seconds = start.elapsed().as_secs_f64();
    Ok(t)
}

fn client(args: &Args, ch: &mut Channel, remote: Ipv4Addr, stop: &AtomicBool) -> Result<Totals, Error> {
    let flow = ch.connect(args.local_ip, remote, args.remote_port)?;
    eprintln!("msg_gen client: connected {}:{} -> {remote}:{}", args.local_ip, flow.src_port, args.remote_port);
    let window = args.msg_window.max(1);
    let mut sent_at = vec![Instant::now(); window as usize];
    let mut out = vec![0u8; args.msg_size];
    fill(&mut out);
    let mut inb = vec![0u8; 8 << 20];
    // Nanoseconds, 3 significant digits: sub-microsecond RTTs (embedded memif) stay visible.
    let mut second = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds");
    let mut all = second.clone();
    let mut t = Totals { role: "client", msg_size: args.msg_size, msg_window: window, ..Totals::default() };
    let (mut tx_s, mut rx_s, mut txb_s, mut rxb_s, mut drops_s) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let send = |ch: &mut Channel, out: &mut Vec<u8>, slot: u64| -> Result<bool, Error> {
        out[..8].copy_from_slice(&slot.to_ne_bytes());
        match ch.send(flow, out) {
            Ok(()) => Ok(true),
            Err(Error::RingFull) | Err(Error::NoBuffers) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let start = Instant::now();
    let mut last_report = start;
    let mut pending: Vec<u64> = Vec::new();
    for slot in 0..window {
        sent_at[slot as usize] = Instant::now();
        if send(ch, &mut out, slot)? {
            t.tx_msgs += 1;
            t.tx_bytes += out.len() as u64;
            tx_s += 1;
            txb_s += out.len() as u64;
        } else {
            t.tx_drops += 1;
            drops_s += 1;
            pending.push(slot);
        }
    }
    let mut handled = false;
    while !finished(args, start, stop, t.rx_msgs) {
        // Slots whose send failed are retried (the original counts them as drops).
        let mut i = 0;
        while i < pending.len() {
            let slot = pending[i];
            sent_at[slot as usize] = Instant::now();
            if send(ch, &mut out, slot)? {
                pending.swap_remove(i);
                t.tx_msgs += 1;
                t.tx_bytes += out.len() as u64;
                tx_s += 1;
                txb_s += out.len() as u64;
            } else {
                i += 1;
            }
        }
        if let Some((n, _)) = recv(args, ch, &mut inb)? {
            let now = Instant::now();
            let mut id = [0u8; 8];
            id.copy_from_slice(&inb[..8]);
            let slot = u64::from_ne_bytes(id);
            if slot < window {
                let rtt = now.duration_since(sent_at[slot as usize]).as_nanos().max(1) as u64;
                let _ = second.record(rtt);
                let _ = all.record(rtt);
                if args.verify {
                    for (i, b) in inb[8..n].iter().enumerate() {
                        if *b != pattern_byte(i + 8) {
                            eprintln!(
                                "msg_gen: response byte {} is {b:#x}, expected {:#x}",
                                i + 8,
                                pattern_byte(i + 8)
                            );
                            std::process::exit(3);
                        }
                    }
                }
                t.rx_msgs += 1;
                t.rx_bytes += n as u64;
                rx_s += 1;
                rxb_s += n as u64;
                handled = true;
                if t.tx_msgs < args.msg_nr {
                    sent_at[slot as usize] = Instant::now();
                    if send(ch, &mut out, slot)? {
                        t.tx_msgs += 1;
                        t.tx_bytes += out.len() as u64;
                        tx_s += 1;
                        txb_s += out.len() as u64;
                    } else {
                        t.tx_drops += 1;
                        drops_s += 1;
                        pending.push(slot);
                    }
                }
            }
        }
        let now = Instant::now();
        if handled && now.duration_since(last_report) >= Duration::from_secs(1) {
            let secs = now.duration_since(last_report).as_secs_f64();
            // Whole microseconds, as the original prints them.
            let pct = |h: &Histogram<u64>, q: f64| {
                if h.is_empty() {
                    "N/A".to_string()
                } else {
                    (h.value_at_quantile(q).div_ceil(1000)).to_string()
                }
            };
            let mut line = format!(
                "TX/RX (msg/sec, Gbps): ({:.1}K/{:.1}K, {:.3}/{:.3}). RTT (p50/99/99.9 us): {}/{}/{}",
                tx_s as f64 / secs / 1e3,
                rx_s as f64 / secs / 1e3,
                txb_s as f64 * 8.0 / secs / 1e9,
                rxb_s as f64 * 8.0 / secs / 1e9,
                pct(&second, 0.5),
                pct(&second, 0.99),
                pct(&second, 0.999)
            );
            if drops_s > 0 {
                line.push_str(&format!(", TX drops: {drops_s}"));
            }
            if !args.json {
                println!("{line}");
            } else {
                eprintln!("{line}");
            }
            second.reset();
            (tx_s, rx_s, txb_s, rxb_s, drops_s) = (0, 0, 0, 0, 0);
            last_report = now;
            handled = false;
        }
    }
    t.seconds = start.elapsed().as_secs_f64();
    t.rps = t.rx_msgs as f64 / t.seconds;
    if !all.is_empty() {
        t.rtt_p50_us = all.value_at_quantile(0.5) as f64 / 1e3;
        t.rtt_p99_us = all.value_at_quantile(0.99) as f64 / 1e3;
        t.rtt_p999_us = all.value_at_quantile(0.999) as f64 / 1e3;
        t.rtt_max_us = all.max() as f64 / 1e3;
        t.rtt_samples = all.len();
    }
    Ok(t)
}
