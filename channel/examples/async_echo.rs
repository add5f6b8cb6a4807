//! async_echo: an echo server and client on the asynchronous channel (`--features tokio`).
//!
//! ```sh
//! # on the machnetd of 198.18.0.2:
//! cargo run -p machnet-channel --features tokio --example async_echo -- server --local 198.18.0.2
//! # on the machnetd of 198.18.0.1: 4 flows, 1000 messages of 1 KiB each, all on one task
//! cargo run -p machnet-channel --features tokio --example async_echo -- client --local 198.18.0.1 --remote 198.18.0.2 --flows 4 --count 1000
//! ```
//!
//! The server echoes every message on its flow until interrupted (or, with `--count N`, until
//! N messages), and says when a peer closes a flow. The client sends `--count` messages on each
//! of `--flows` flows with one outstanding per flow, checks every echo, closes its flows and
//! prints the round trips' median. The control socket comes from `$MACHNET_CTRL_SOCK` or the
//! default path. Both run on a current-thread runtime: one thread, one task.

use machnet::asyncio::{AsyncChannel, Incoming};
use machnet::client::{Error, Machnet};
use machnet::layout::MachnetFlow;
use machnet::EventKind;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The port the server listens on.
pub const PORT: u16 = 31590;

/// Echoes every message back on its flow until `count` messages (`None`: forever); returns how
/// many it echoed and how many flows their peers closed.
pub async fn serve(ch: &mut AsyncChannel, count: Option<u64>) -> Result<(u64, u64), Error> {
    let mut buf = vec![0u8; machnet::MSG_MAX_LEN];
    let (mut echoed, mut closed) = (0, 0);
    while count.is_none_or(|c| echoed < c) {
        match ch.recv_or_event(&mut buf).await? {
            Incoming::Message(n, flow) => {
                ch.send(flow.reversed(), &buf[..n]).await?;
                echoed += 1;
            }
            Incoming::Event(ev) if ev.kind == EventKind::FlowClosed => closed += 1,
            Incoming::Event(_) => {}
        }
    }
    Ok((echoed, closed))
}

/// Byte `j` of message `k` on flow `f`.
fn pattern(f: usize, k: u64, j: usize) -> u8 {
    (f as u64 * 31 + k * 7 + j as u64) as u8
}

/// Connects `flows` flows to `remote:PORT`, sends `count` messages of `size` bytes on each with
/// one outstanding per flow, all from this one task, checks every echo and closes the flows.
/// Returns every round trip.
pub async fn ping(
    ch: &mut AsyncChannel,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    flows: usize,
    count: u64,
    size: usize,
) -> Result<Vec<Duration>, Error> {
    let mut open: Vec<MachnetFlow> = Vec::with_capacity(flows);
    for _ in 0..flows {
        open.push(ch.connect(local, remote, PORT).await?);
    }
    let mut msg = vec![0u8; size];
    let mut buf = vec![0u8; size.max(1)];
    let mut sent_at = vec![Instant::now(); flows];
    let mut next = vec![0u64; flows];
    let mut rtts = Vec::with_capacity(flows * count as usize);
    for (f, &flow) in open.iter().enumerate() {
        msg.iter_mut().enumerate().for_each(|(j, b)| *b = pattern(f, 0, j));
        sent_at[f] = Instant::now();
        ch.send(flow, &msg).await?;
    }
    let mut done = 0;
    while done < flows {
        let (n, from) = ch.recv(&mut buf).await?;
        let f = open.iter().position(|o| o.reversed() == from).ok_or(Error::Protocol)?;
        let k = next[f];
        if n != size || buf[..n].iter().enumerate().any(|(j, &b)| b != pattern(f, k, j)) {
            return Err(Error::Protocol);
        }
        rtts.push(sent_at[f].elapsed());
        next[f] += 1;
        if next[f] == count {
            done += 1;
            continue;
        }
        msg.iter_mut().enumerate().for_each(|(j, b)| *b = pattern(f, next[f], j));
        sent_at[f] = Instant::now();
        ch.send(open[f], &msg).await?;
    }
    for flow in open {
        ch.close(flow).await?;
    }
    Ok(rtts)
}

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(2);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

fn ip(name: &str) -> Result<Ipv4Addr, String> {
    arg(name).and_then(|s| s.parse().ok()).ok_or(format!("{name} <ipv4> is required"))
}

fn num(name: &str, default: u64) -> Result<u64, String> {
    arg(name).map_or(Ok(default), |s| s.parse().map_err(|_| format!("{name} takes a number")))
}

async fn run(role: &str) -> Result<(), String> {
    let m = Machnet::init().map_err(|e| format!("cannot register with machnetd: {e}"))?;
    let mut ch = AsyncChannel::new(m.attach().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    match role {
        "server" => {
            let local = ip("--local")?;
            ch.listen(local, PORT).await.map_err(|e| format!("listen on {local}:{PORT}: {e}"))?;
            println!("echoing on {local}:{PORT}");
            let count = arg("--count").map(|_| num("--count", 0)).transpose()?;
            let (n, closed) = serve(&mut ch, count).await.map_err(|e| e.to_string())?;
            println!("echoed {n} messages; {closed} flows closed by their peers");
        }
        "client" => {
            let (local, remote) = (ip("--local")?, ip("--remote")?);
            let (flows, count, size) = (num("--flows", 1)?, num("--count", 1000)?, num("--size", 1024)?);
            let mut rtts =
                ping(&mut ch, local, remote, flows as usize, count, size as usize).await.map_err(|e| e.to_string())?;
            rtts.sort();
            let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
            println!("{} echoes on {flows} flows, median round trip {:.1} us", rtts.len(), median.as_secs_f64() * 1e6);
        }
        _ => return Err("the first argument is server or client".into()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let role = std::env::args().nth(1).unwrap_or_default();
    if role.is_empty() || role == "--help" || role == "-h" {
        println!("usage: async_echo server --local <ip> [--count N]");
        println!("       async_echo client --local <ip> --remote <ip> [--flows N] [--count N] [--size BYTES]");
        return ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match rt.block_on(run(&role)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("async_echo: {e}");
            ExitCode::from(1)
        }
    }
}
