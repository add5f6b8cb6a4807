//! machnetctl: look inside a running machnetd (see `machnetctl --help` and
//! docs/operations.md). It reads the snapshots the daemon's shards publish, through the
//! control socket; it never stalls a shard.

use clap::{Parser, Subcommand};
use machnet::ctrl::{CallError, CtrlClient};
use machnet::ops::Status;
use machnet_daemon::controller::{STATS_ARP, STATS_CHANNELS, STATS_FLOWS};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// machnetctl: statistics of a running machnetd, over its control socket.
#[derive(Parser, Debug)]
#[command(name = "machnetctl", version)]
struct Cli {
    /// Control socket of the daemon. Default: $MACHNET_CTRL_SOCK, else
    /// /var/run/machnet/machnet_ctrl.sock.
    #[arg(long, global = true)]
    ctrl_sock: Option<PathBuf>,
    /// Print the daemon's JSON document instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Refresh every N seconds until interrupted.
    #[arg(long, global = true, value_name = "N")]
    watch: Option<f64>,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug, Clone)]
enum What {
    /// Address, backend and port, shards, uptime, totals.
    Status,
    /// Per shard: core, busy share, loops, parks, stalls, stage costs, packets, hand-offs.
    Shards,
    /// Every flow: addresses, state, owner, congestion window, RTT, retransmissions, traffic.
    Flows,
    /// Every channel: owner, buffers in use, traffic, refusals, violations.
    Channels,
    /// Registered applications.
    Apps,
    /// ARP tables.
    Arp,
    /// Capture the frames the shards receive and send, as pcapng (`tcpdump -r`, `tshark -r`,
    /// Wireshark; tools/wireshark/machnet.lua decodes the Machnet header). Stops after
    /// --count packets, --duration seconds, or at Ctrl-C.
    Capture(CaptureArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct CaptureArgs {
    /// Write the capture to FILE; '-' is standard output (`machnetctl capture -w - | tshark -r -`).
    #[arg(short = 'w', long = "write", value_name = "FILE", default_value = "-")]
    write: String,
    /// Stop after N packets.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after S seconds.
    #[arg(long, value_name = "S")]
    duration: Option<f64>,
    /// Only the frames of one flow, either direction: LOCAL_IP:PORT-REMOTE_IP:PORT as
    /// `machnetctl flows` prints it.
    #[arg(long, value_name = "LOCAL:PORT-REMOTE:PORT")]
    flow: Option<String>,
    /// Only IPv4 frames from or to this address.
    #[arg(long)]
    ip: Option<std::net::Ipv4Addr>,
    /// Only UDP frames from or to this port.
    #[arg(long)]
    port: Option<u16>,
    /// Bytes kept of each frame (1..=9216).
    #[arg(long, default_value_t = 9216, value_parser = clap::value_parser!(u16).range(1..=9216))]
    snaplen: u16,
}

fn selector(w: &What) -> u64 {
    match w {
        What::Flows => STATS_FLOWS | STATS_CHANNELS,
        What::Channels => STATS_CHANNELS,
        What::Arp => STATS_ARP,
        What::Status | What::Shards | What::Apps | What::Capture(_) => 0,
    }
}

fn parse_flow(s: &str) -> Result<(u16, std::net::Ipv4Addr, u16), String> {
    let bad = || format!("--flow {s:?}: expected LOCAL_IP:PORT-REMOTE_IP:PORT, e.g. 198.18.0.1:1024-198.18.0.2:888");
    let (l, r) = s.split_once('-').ok_or_else(bad)?;
    let l: std::net::SocketAddrV4 = l.trim().parse().map_err(|_| bad())?;
    let r: std::net::SocketAddrV4 = r.trim().parse().map_err(|_| bad())?;
    Ok((l.port(), *r.ip(), r.port()))
}

/// `machnetctl capture`: start, read every 20 ms, stop; the pcapng goes to the file or stdout.
fn capture(path: &std::path::Path, a: &CaptureArgs, stop: &std::sync::atomic::AtomicBool) -> Result<String, String> {
    use machnet::ctrl::{CAPTURE_READ, CAPTURE_START, CAPTURE_STOP};
    use machnet_daemon::capture::{encode_args, first_packets, Filter};
    use std::io::Write;
    let flow = a.flow.as_deref().map(parse_flow).transpose()?;
    let filter = Filter { ip: a.ip, port: a.port, flow };
    let hint = "is machnetd running? (--ctrl-sock or MACHNET_CTRL_SOCK names its socket)";
    let mut c = CtrlClient::connect(path, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach machnetd at {}: {e}; {hint}", path.display()))?;
    let call_err = |e: CallError| match e {
        CallError::Status(Status::NotPermitted) => "machnetd refused: this user is not on its access list".to_string(),
        CallError::Status(Status::AddrInUse) => "another capture is running on this machnetd".to_string(),
        CallError::Status(Status::BadRequest) => {
            "machnetd does not support packet capture (an older version?)".to_string()
        }
        e => format!("capture request failed: {e:?}"),
    };
    let mut out: Box<dyn Write> = if a.write == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.write).map_err(|e| format!("cannot create {}: {e}", a.write))?,
        ))
    };
    let split = |reply: Vec<u8>| -> Result<(u64, Vec<u8>), String> {
        if reply.len() < 16 {
            return Err("short capture reply from machnetd".into());
        }
        Ok((u64::from_le_bytes(reply[0..8].try_into().unwrap()), reply[16..].to_vec()))
    };
    let (_, head) = split(c.capture(CAPTURE_START, encode_args(&filter, usize::from(a.snaplen))).map_err(call_err)?)?;
    out.write_all(&head).and_then(|_| out.flush()).map_err(|e| format!("cannot write the capture: {e}"))?;
    let until = a.duration.map(|s| std::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let (mut written, mut dropped) = (0u64, 0u64);
    let (mut last, mut busy) = (false, false);
    while !last {
        last = stop.load(std::sync::atomic::Ordering::Relaxed) || until.is_some_and(|t| std::time::Instant::now() >= t);
        if !last && !busy {
            std::thread::sleep(Duration::from_millis(20));
        }
        let op = if last { CAPTURE_STOP } else { CAPTURE_READ };
        let (d, body) = split(c.capture(op, [0; 24]).map_err(call_err)?)?;
        dropped = d;
        let want = a.count.map_or(usize::MAX, |n| (n - written) as usize);
        let (len, n) = first_packets(&body, want);
        // A full read means more are waiting.
        busy = first_packets(&body, usize::MAX).1 >= machnet_daemon::capture::READ_MAX;
        written += n as u64;
        if let Err(e) = out.write_all(&body[..len]).and_then(|_| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                // The reader went away (`| head`): a normal end.
                let _ = c.capture(CAPTURE_STOP, [0; 24]);
                break;
            }
            return Err(format!("cannot write the capture: {e}"));
        }
        if a.count.is_some_and(|n| written >= n) && !last {
            let _ = c.capture(CAPTURE_STOP, [0; 24]);
            break;
        }
    }
    Ok(format!("{written} packets captured; {dropped} not captured (the capture fell behind the traffic)"))
}

fn fetch(path: &std::path::Path, sel: u64) -> Result<Value, String> {
    let hint = "is machnetd running? (--ctrl-sock or MACHNET_CTRL_SOCK names its socket)";
    let mut c = CtrlClient::connect(path, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach machnetd at {}: {e}; {hint}", path.display()))?;
    let bytes = c.stats(sel).map_err(|e| match e {
        CallError::Status(Status::NotPermitted) => {
            format!("machnetd at {} refused: this user is not on its access list", path.display())
        }
        CallError::Status(Status::BadRequest) => {
            format!("machnetd at {} does not answer statistics requests (an older version?)", path.display())
        }
        CallError::Status(s) => format!("machnetd refused: {s}"),
        CallError::Io(e) => format!("no answer from machnetd at {}: {e}", path.display()),
        CallError::Protocol => "malformed answer from machnetd".to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("malformed statistics from machnetd: {e}"))
}

/// A plain text table with right-aligned numbers.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Self {
        Table { head: head.to_vec(), rows: Vec::new() }
    }
    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    fn render(&self) -> String {
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || ".%-".contains(c));
        let mut out = String::new();
        let line = |cells: Vec<String>, out: &mut String| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| if numeric(c) { format!("{c:>w$}", w = w[i]) } else { format!("{c:<w$}", w = w[i]) })
                .collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(self.head.iter().map(|h| h.to_string()).collect(), &mut out);
        for r in &self.rows {
            line(r.clone(), &mut out);
        }
        if self.rows.is_empty() {
            out.push_str("(none)\n");
        }
        out
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn duration(secs: f64) -> String {
    let t = secs as u64;
    match t {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        _ => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
    }
}

fn bytes(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b}"),
        10_000..=9_999_999 => format!("{}K", b / 1000),
        10_000_000..=9_999_999_999 => format!("{}M", b / 1_000_000),
        _ => format!("{}G", b / 1_000_000_000),
    }
}

fn render(what: &What, d: &Value) -> String {
    match what {
        What::Status => {
            let st = &d["status"];
            format!(
                "machnetd pid {}, up {}\n  address   {} ({})\n  backend   {}: {}\n  shards    {} ({})\n  traffic   {} apps, {} channels, {} flows\n  config    {}\n  refused   {} (access list)\n",
                s(&st["pid"]),
                duration(st["uptime_s"].as_f64().unwrap_or(0.0)),
                s(&st["ip"]),
                s(&st["mac"]),
                s(&st["backend"]),
                s(&st["port"]),
                s(&st["shards"]),
                s(&st["idle"]),
                s(&st["apps"]),
                s(&st["channels"]),
                s(&st["flows"]),
                s(&st["config"]),
                s(&st["access_refused"]),
            )
        }
        What::Shards => {
            let mut t = Table::new(&[
                "shard",
                "core",
                "busy%",
                "loops",
                "parks",
                "stalls",
                "max loop us",
                "channels",
                "flows",
                "half-open",
                "syn evicted",
                "rx pkts",
                "tx pkts",
                "retx",
                "handed out",
                "handed in",
                "violations",
            ]);
            let mut stages = Table::new(&["shard", "stage", "polls", "work", "busy%", "max poll us", "stalls"]);
            // Where the longest loop's time went (its publish window, as the kernel counted the
            // shard thread): running our code, waiting for a CPU other processes had, parked,
            // or unaccounted (the host took the virtual CPU away).
            let mut long = Table::new(&[
                "shard",
                "max loop us",
                "window us",
                "ran us",
                "waited us",
                "parked us",
                "host us",
                "cpu s",
                "runqueue s",
            ]);
            for sh in d["shards"].as_array().into_iter().flatten() {
                let st = sh["stages"].as_array().cloned().unwrap_or_default();
                let busy: u64 = st.iter().map(|x| u(&x["busy_ns"])).sum();
                let idle: u64 = st.iter().map(|x| u(&x["idle_ns"])).sum();
                let total = (busy + idle).max(1);
                let e = &sh["endpoint"];
                let c = &sh["counters"];
                t.row(vec![
                    s(&sh["index"]),
                    s(&sh["core"]),
                    format!("{:.1}", 100.0 * busy as f64 / total as f64),
                    s(&sh["loops"]),
                    s(&sh["parks"]),
                    s(&sh["stalls"]),
                    s(&sh["max_loop_us"]),
                    s(&sh["channels"]),
                    s(&sh["flows"]),
                    s(&sh["half_open"]),
                    s(&e["syn_evicted"]),
                    s(&e["rx_packets"]),
                    // Every frame sent: first transmissions, retransmissions, ACKs, RSTs.
                    format!("{}", u(&e["tx_data"]) + u(&e["tx_retransmits"]) + u(&e["tx_acks"]) + u(&e["tx_rsts"])),
                    s(&e["tx_retransmits"]),
                    s(&c["handoff_sent"]),
                    s(&c["handoff_received"]),
                    s(&c["channel_violations"]),
                ]);
                let w = &sh["max_loop_window"];
                let us = |v: &serde_json::Value| format!("{:.0}", v.as_f64().unwrap_or(0.0));
                long.row(vec![
                    s(&sh["index"]),
                    us(&sh["max_loop_us"]),
                    us(&w["window_us"]),
                    us(&w["ran_us"]),
                    us(&w["waited_us"]),
                    us(&w["parked_us"]),
                    us(&w["unaccounted_us"]),
                    format!("{:.2}", sh["cpu_s"].as_f64().unwrap_or(0.0)),
                    format!("{:.2}", sh["runqueue_s"].as_f64().unwrap_or(0.0)),
                ]);
                for x in &st {
                    stages.row(vec![
                        s(&sh["index"]),
                        s(&x["name"]),
                        s(&x["polls"]),
                        s(&x["work"]),
                        format!("{:.1}", 100.0 * u(&x["busy_ns"]) as f64 / total as f64),
                        format!("{:.1}", u(&x["max_poll_ns"]) as f64 / 1e3),
                        s(&x["stalls"]),
                    ]);
                }
            }
            format!("{}\n{}\n{}", t.render(), stages.render(), long.render())
        }
        What::Flows => {
            let mut t = Table::new(&[
                "shard", "local", "remote", "state", "pid", "channel", "cwnd", "srtt us", "retx", "tx msgs",
                "tx bytes", "rx msgs", "rx bytes",
            ]);
            for f in d["flows"].as_array().into_iter().flatten() {
                t.row(vec![
                    s(&f["shard"]),
                    s(&f["local"]),
                    s(&f["remote"]),
                    s(&f["state"]),
                    s(&f["pid"]),
                    s(&f["channel"]),
                    s(&f["cwnd"]),
                    s(&f["srtt_us"]),
                    s(&f["retransmits"]),
                    s(&f["tx_msgs"]),
                    bytes(u(&f["tx_bytes"])),
                    s(&f["rx_msgs"]),
                    bytes(u(&f["rx_bytes"])),
                ]);
            }
            let sources = d["half_open_sources"].as_array().cloned().unwrap_or_default();
            if sources.is_empty() {
                return t.render();
            }
            // A SYN flood shows here: who holds the half-open flows.
            let mut h = Table::new(&["shard", "source", "half-open flows"]);
            for x in &sources {
                h.row(vec![s(&x["shard"]), s(&x["ip"]), s(&x["half_open"])]);
            }
            format!("{}\n{}", t.render(), h.render())
        }
        What::Channels => {
            let mut t = Table::new(&[
                "channel",
                "app",
                "pid",
                "shard",
                "state",
                "tx bufs app/engine/all",
                "rx bufs app/engine/all",
                "tx msgs",
                "rx msgs",
                "rx full",
                "refused",
                "violations",
            ]);
            for c in d["channels"].as_array().into_iter().flatten() {
                let state = if c["lingering"].as_bool() == Some(true) {
                    "draining"
                } else if c["blocked"].as_bool() == Some(true) {
                    "app slow"
                } else {
                    "open"
                };
                t.row(vec![
                    s(&c["id"]),
                    s(&c["app"]),
                    s(&c["pid"]),
                    s(&c["shard"]),
                    state.into(),
                    format!("{}/{}/{}", u(&c["tx_app"]), u(&c["tx_engine"]), u(&c["tx_bufs"])),
                    format!("{}/{}/{}", u(&c["rx_app"]), u(&c["rx_engine"]), u(&c["rx_bufs"])),
                    s(&c["tx_msgs"]),
                    s(&c["rx_msgs"]),
                    s(&c["rx_full"]),
                    s(&c["refused"]),
                    s(&c["violations"]),
                ]);
            }
            t.render()
        }
        What::Apps => {
            let mut t = Table::new(&["app", "pid", "uid", "gid", "registered", "channels"]);
            for a in d["apps"].as_array().into_iter().flatten() {
                let chans: Vec<String> = a["channels"].as_array().into_iter().flatten().map(s).collect();
                t.row(vec![
                    s(&a["id"]),
                    s(&a["pid"]),
                    s(&a["uid"]),
                    s(&a["gid"]),
                    duration(a["registered_s"].as_f64().unwrap_or(0.0)),
                    chans.join(","),
                ]);
            }
            t.render()
        }
        What::Arp => {
            let mut t = Table::new(&["shard", "ip", "mac", "static"]);
            for e in d["arp"].as_array().into_iter().flatten() {
                t.row(vec![s(&e["shard"]), s(&e["ip"]), s(&e["mac"]), s(&e["static"])]);
            }
            t.render()
        }
        What::Capture(_) => String::new(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.ctrl_sock.clone().unwrap_or_else(machnet::ctrl::socket_path);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    if let What::Capture(a) = &cli.what {
        return match capture(&path, a, &stop) {
            Ok(summary) => {
                eprintln!("machnetctl: {summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("machnetctl: {e}");
                ExitCode::from(1)
            }
        };
    }
    loop {
        match fetch(&path, selector(&cli.what)) {
            Ok(doc) => {
                if cli.watch.is_some() {
                    // Clear the screen, home the cursor.
                    print!("\x1b[2J\x1b[H");
                }
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&doc).expect("serialisable"));
                } else {
                    print!("{}", render(&cli.what, &doc));
                }
            }
            Err(e) => {
                eprintln!("machnetctl: {e}");
                return ExitCode::from(1);
            }
        }
        let Some(secs) = cli.watch else { return ExitCode::SUCCESS };
        let until = std::time::Instant::now() + Duration::from_secs_f64(secs.max(0.1));
        while std::time::Instant::now() < until {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return ExitCode::SUCCESS;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
