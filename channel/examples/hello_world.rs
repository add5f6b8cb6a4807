//! hello_world, as in the original Machnet: both roles listen on `<local>:31580`; with
//! `--remote` the program connects to `<remote>:31580` and sends `Hello World!`; without it,
//! it waits for messages and prints them. Unlike the original, the server answers each message
//! with the same text and the client waits for that answer (so a run shows a full round trip).
//!
//! `cargo run -p machnet-channel --example hello_world -- --local 198.18.0.1 [--remote 198.18.0.2]`
//! (the control socket comes from `$MACHNET_CTRL_SOCK` or the default path).

use machnet::client::Machnet;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const PORT: u16 = 31580;

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            return Some(v.to_string());
        }
    }
    None
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("usage: hello_world --local <ip> [--remote <ip>]");
        return ExitCode::SUCCESS;
    }
    let Some(local) = arg("--local").and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
        eprintln!("hello_world: --local <ip> is required (the local machnetd's IP)");
        return ExitCode::from(2);
    };
    let remote = match arg("--remote").map(|s| s.parse::<Ipv4Addr>()) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => {
            eprintln!("hello_world: --remote must be an IPv4 address");
            return ExitCode::from(2);
        }
    };
    match run(local, remote) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello_world: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(local: Ipv4Addr, remote: Option<Ipv4Addr>) -> Result<(), machnet::client::Error> {
    let machnet = Machnet::init()?;
    let mut ch = machnet.attach()?;
    ch.listen(local, PORT)?;
    println!("Listening on {local}:{PORT}");
    let mut buf = vec![0u8; 1 << 20];
    match remote {
        Some(remote) => {
            let t = Instant::now();
            let flow = ch.connect(local, remote, PORT)?;
            println!("Connected to {remote}:{PORT} from port {} in {:?}", flow.src_port, t.elapsed());
            ch.send(flow, b"Hello World!")?;
            match ch.recv_blocking(&mut buf, Some(Duration::from_secs(5)))? {
                Some((n, _)) => {
                    println!("Reply: {}, round trip {:?}", String::from_utf8_lossy(&buf[..n]), t.elapsed());
                    Ok(())
                }
                None => Err(machnet::client::Error::TimedOut),
            }
        }
        None => {
            println!("Waiting for message from client");
            let mut count = 0u64;
            loop {
                if let Some((n, flow)) = ch.recv_blocking(&mut buf, None)? {
                    count += 1;
                    println!("Received message: {}, count = {count}", String::from_utf8_lossy(&buf[..n]));
                    // Reply on the reversed flow.
                    let back = machnet::layout::MachnetFlow {
                        src_ip: flow.dst_ip,
                        dst_ip: flow.src_ip,
                        src_port: flow.dst_port,
                        dst_port: flow.src_port,
                    };
                    ch.send(back, &buf[..n])?;
                }
            }
        }
    }
}
