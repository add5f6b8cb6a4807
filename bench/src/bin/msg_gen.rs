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
use machnet::client::{Channel, Error, Machnet};
use machnet::layout::MachnetFlow;
use machnet_bench::rpc::{self, RpcError, RpcIo, RpcOptions};
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

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

/// The client library as the RPC loop's transport.
struct Io<'a> {
    ch: &'a mut Channel,
    blocking: bool,
}

fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

fn rpc_err(e: Error) -> RpcError {
    RpcError(e.to_string())
}

impl RpcIo for Io<'_> {
    type Peer = MachnetFlow;

    fn send(&mut self, to: MachnetFlow, msg: &[u8]) -> Result<bool, RpcError> {
        match self.ch.send(to, msg) {
            Ok(()) => Ok(true),
            Err(Error::RingFull) | Err(Error::NoBuffers) => Ok(false),
            Err(e) => Err(rpc_err(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, RpcError> {
        let r = if self.blocking {
            self.ch.recv_blocking(buf, Some(Duration::from_millis(100)))
        } else {
            self.ch.recv(buf)
        };
        // Answers go back on the flow a request came in on, seen from this side.
        r.map(|m| m.map(|(n, flow)| (n, reverse(flow)))).map_err(rpc_err)
    }
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
    let opts = RpcOptions {
        msg_size: args.msg_size,
        window: args.msg_window,
        msg_nr: args.msg_nr,
        verify: args.verify,
        duration: args.duration.map(Duration::from_secs_f64),
        lines_to_stderr: args.json,
    };
    let result = (|| -> Result<rpc::Totals, RpcError> {
        let machnet = Machnet::init().map_err(rpc_err)?;
        let mut ch = machnet.attach().map_err(rpc_err)?;
        let t = match remote {
            None => {
                ch.listen(args.local_ip, args.local_port).map_err(rpc_err)?;
                eprintln!("msg_gen server: listening on {}:{}", args.local_ip, args.local_port);
                rpc::serve(&mut Io { ch: &mut ch, blocking: args.blocking }, &opts, &stop)?
            }
            Some(ip) => {
                let flow = ch.connect(args.local_ip, ip, args.remote_port).map_err(rpc_err)?;
                eprintln!("msg_gen client: connected {}:{} -> {ip}:{}", args.local_ip, flow.src_port, args.remote_port);
                rpc::run_client(&mut Io { ch: &mut ch, blocking: args.blocking }, flow, &opts, &stop)?
            }
        };
        // Let the last replies leave before the channel goes.
        std::thread::sleep(Duration::from_millis(20));
        Ok(t)
    })();
    match result {
        Ok(t) => {
            println!("{}", rpc::totals_line(&t));
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
