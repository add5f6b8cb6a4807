//! scenario: runs a benchmark scenario end to end, with its baselines in the same invocation,
//! interleaved run by run, and prints medians (min, max) and ratios as markdown.
//!
//! ```text
//! ./scripts/bench.sh udp --runs 3 --seconds 5
//! ```
//!
//! Scenarios:
//! * `udp` (S3): two machnetd over the udp backend on this machine (A on CPU 0, B on CPU 1,
//!   adaptive idle), msg_gen client on CPU 0 and server on CPU 1 (`--blocking`: they sleep on
//!   the doorbell), against kernel UDP ping-pong (blocking and busy-poll receive) and kernel
//!   TCP request/response on loopback, same loop, same sizes.
//! * `memif` (S1, needs binaries built with the `dpdk` feature): two machnetd joined by DPDK
//!   memif, daemon A pinned to CPU 0 and B to CPU 1 with adaptive idle, msg_gen `--blocking`
//!   client on CPU 0 and server on CPU 1; against a raw memif ping-pong of frames of the same
//!   wire size with no protocol (the physical reference, both CPUs busy-polling) and the
//!   kernel baselines.
//! * `embedded` (S2, `dpdk` build): two `msg_gen --embedded` joined by memif, no daemon, the
//!   client busy-polling on CPU 0 and the server on CPU 1; against raw memif and the kernel
//!   baselines. `--compare-bin-dir DIR --compare-label NAME` adds the same pair built
//!   elsewhere (before/after a change), interleaved with it in every run.
//! * `shared` (S8): the `udp` topology (each application on its daemon's CPU, as in the demo)
//!   with msg_gen busy-polling `machnet_recv` (no `--blocking`, as the original's msg_gen does)
//!   under `MACHNET_POLL=adaptive` (the default) and `MACHNET_POLL=spin`, against msg_gen
//!   `--blocking`, interleaved.
//! * `busy` (S7): the `udp` topology with two CPU hogs per CPU (shell loops at normal priority)
//!   for the whole run: Swift (the default) against the original's `Fixed(32)` window, daemons
//!   restarted for each, interleaved; reports frames per RPC and retransmissions per thousand
//!   RPCs from the client daemon's counters.
//!
//! * `bulk` (S6, `dpdk` build): large messages (64 KiB, 1 MiB and 8 MiB at windows 1 and 8):
//!   `msg_gen --embedded` over memif and two machnetd over memif with msg_gen `--blocking`,
//!   against raw memif moving the same bytes in full-size frames (window: the message's
//!   frames times the window, at most 512) and kernel TCP request/response on loopback, in
//!   Gbit/s each way (every RPC moves its size each way) with p50/p99 per message; and the
//!   embedded pair with a constant 256-packet window in place of Swift (`--fixed_window`).
//!
//! Every configuration runs at window 1 (E1) and 32 (E2), 64 B and 1 KiB (`bulk`: the sizes
//! and windows above), unless narrowed by `--windows` and `--sizes`. The raw results go to
//! `--out` (JSON) for plotting.

use clap::Parser;
use machnet_bench::rpc::{Totals, KERNEL_UDP_MAX_MSG};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "scenario", version, about = "Run a benchmark scenario with its baselines")]
struct Args {
    /// Scenario: udp (S3), memif (S1), embedded (S2), bulk (S6), busy (S7) or shared (S8).
    scenario: String,
    /// Interleaved runs (medians over these).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Message sizes, bytes (64,1024; bulk: 65536,1048576,8388608).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Windows (1,32; bulk: 1,8).
    #[arg(long, value_delimiter = ',')]
    windows: Option<Vec<u64>>,
    /// Raw results (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory holding machnetd, msg_gen and kernel_rpc (default: this program's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Skip the baselines (quick checks only; the report then has no ratios).
    #[arg(long)]
    no_baselines: bool,
    /// `embedded` only: also measure the system under test with the msg_gen of this
    /// directory (another build: before/after a change), interleaved with it in every run and
    /// reported as a baseline named by `--compare-label`.
    #[arg(long)]
    compare_bin_dir: Option<PathBuf>,
    /// The name of the `--compare-bin-dir` build in the report.
    #[arg(long, default_value = "other build")]
    compare_label: String,
}

#[derive(Debug, Clone, Serialize)]
struct Record {
    system: String,
    msg_size: usize,
    window: u64,
    run: usize,
    totals: Totals,
}

/// A child process killed (SIGINT, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, String> {
        let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc { name: name.into(), child })
    }

    fn interrupt(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
    }

    /// Waits up to `limit` for the process to exit; returns its stdout.
    fn finish(mut self, limit: Duration) -> Result<String, String> {
        self.finish_ref(limit)
    }

    fn finish_ref(&mut self, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    let mut out = String::new();
                    if let Some(mut o) = self.child.stdout.take() {
                        let _ = o.read_to_string(&mut out);
                    }
                    if !status.success() {
                        return Err(format!("{} exited with {status}", self.name));
                    }
                    return Ok(out);
                }
                Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
                _ => return Err(format!("{} did not finish within {limit:?}", self.name)),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one full-size (1514 B) frame carries of a message: the Ethernet, IPv4, UDP and
/// Machnet headers (96 B with the frame check) taken off.
const RAW_PAYLOAD: usize = 1514 - 96;

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("an ephemeral port")
}

fn parse_totals(out: &str) -> Result<Totals, String> {
    let line = out.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| format!("no JSON in output:\n{out}"))?;
    serde_json::from_str(line).map_err(|e| format!("bad JSON ({e}): {line}"))
}

fn wait_for(path: &Path, what: &str) -> Result<(), String> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{what} did not create {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Env {
    bin: PathBuf,
    work: PathBuf,
    seconds: f64,
}

impl Env {
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        c.stdin(Stdio::null());
        c
    }

    /// One client/server measurement: `server` and `client` get the common flags.
    fn pair(&self, name: &str, server: Command, client: Command) -> Result<Totals, String> {
        self.pair_ready(name, server, client, None)
    }

    /// As [`pair`](Self::pair), starting the client once `ready` exists (if given).
    fn pair_ready(&self, name: &str, server: Command, client: Command, ready: Option<&Path>) -> Result<Totals, String> {
        let (mut server, mut client) = (server, client);
        server.stdout(Stdio::null()).stderr(Stdio::null());
        let mut srv = Proc::spawn(&format!("{name} server"), &mut server)?;
        if let Some(p) = ready {
            wait_for(p, name)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        client.arg("--duration").arg(self.seconds.to_string()).arg("--json");
        client.stdout(Stdio::piped()).stderr(Stdio::null());
        let cl = Proc::spawn(&format!("{name} client"), &mut client)?;
        let out = cl.finish(Duration::from_secs_f64(self.seconds + 30.0))?;
        srv.interrupt();
        let _ = srv.finish(Duration::from_secs(5));
        parse_totals(&out)
    }

    fn kernel(&self, proto: &str, busy: bool, size: usize, window: u64) -> Result<Totals, String> {
        let port = free_udp_port();
        let common = |c: &mut Command| {
            c.args(["--proto", proto, "--msg_size", &size.to_string(), "--msg_window", &window.to_string()]);
            if busy {
                c.arg("--busy_poll");
            }
        };
        let mut s = self.cmd("kernel_rpc");
        s.arg("--listen").arg(format!("127.0.0.1:{port}"));
        common(&mut s);
        let mut c = self.cmd("kernel_rpc");
        c.arg("--connect").arg(format!("127.0.0.1:{port}"));
        common(&mut c);
        self.pair(&format!("kernel {proto}"), s, c)
    }

    /// Two machnetd over the udp backend, A on CPU 0 and B on CPU 1, with `transport` (a JSON
    /// object or empty) as their `machnet_rs.transport`; returns them and their control sockets.
    fn udp_daemons(&self, transport: &str) -> Result<(Vec<Proc>, [PathBuf; 2]), String> {
        let ports = [free_udp_port(), free_udp_port()];
        let mut procs = Vec::new();
        let mut socks = [PathBuf::new(), PathBuf::new()];
        for i in 0..2 {
            let cfg = self.work.join(format!("d{i}.json"));
            let json = format!(
                r#"{{"machnet_config": {{"02:00:00:00:00:0{}": {{"ip": "198.18.0.{}", "cpu_mask": "{}"}}}},
 "machnet_rs": {{"backend": "udp", "idle": "adaptive", "udp": {{"bind": "127.0.0.1:{}", "peers": ["127.0.0.1:{}"]}}{}}}}}"#,
                i + 1,
                i + 1,
                if i == 0 { "0x1" } else { "0x2" },
                ports[i],
                ports[1 - i],
                if transport.is_empty() { String::new() } else { format!(r#", "transport": {transport}"#) }
            );
            std::fs::write(&cfg, json).map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
            socks[i] = self.work.join(format!("d{i}.sock"));
            let _ = std::fs::remove_file(&socks[i]);
            let mut c = self.cmd("machnetd");
            c.arg("--config").arg(&cfg).arg("--ctrl-sock").arg(&socks[i]).arg("--log-level").arg("warn");
            c.stdout(Stdio::null()).stderr(Stdio::inherit());
            procs.push(Proc::spawn(&format!("machnetd {i}"), &mut c)?);
        }
        for s in &socks {
            wait_for(s, "machnetd")?;
        }
        Ok((procs, socks))
    }

    /// Two machnetd joined by memif: A (the memif server) on CPU 0, B on CPU 1.
    fn memif_daemons(&self) -> Result<(Vec<Proc>, [PathBuf; 2]), String> {
        let memif = self.work.join("memif.sock");
        let _ = std::fs::remove_file(&memif);
        let mut procs = Vec::new();
        let socks = [self.work.join("m0.sock"), self.work.join("m1.sock")];
        for (i, sock) in socks.iter().enumerate() {
            let cfg = self.work.join(format!("m{i}.json"));
            let role = if i == 0 { "server" } else { "client" };
            let json = format!(
                r#"{{"machnet_config": {{"02:00:00:00:00:0{}": {{"ip": "198.18.0.{}", "cpu_mask": "{}"}}}},
 "machnet_rs": {{"backend": "dpdk", "idle": "adaptive",
                "dpdk": {{"device": "net_memif0,role={role},id=0,socket={},socket-abstract=no"}}}}}}"#,
                i + 1,
                i + 1,
                if i == 0 { "0x1" } else { "0x2" },
                memif.display()
            );
            std::fs::write(&cfg, json).map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
            let _ = std::fs::remove_file(sock);
            let mut c = self.cmd("machnetd");
            c.arg("--config").arg(&cfg).arg("--ctrl-sock").arg(sock).arg("--log-level").arg("warn");
            c.stdout(Stdio::null()).stderr(Stdio::inherit());
            procs.push(Proc::spawn(&format!("machnetd {i}"), &mut c)?);
            if i == 0 {
                wait_for(&memif, "the memif server machnetd")?;
            }
        }
        for s in &socks {
            wait_for(s, "machnetd")?;
        }
        Ok((procs, socks))
    }

    /// msg_gen client on daemon 0 and server on daemon 1, pinned to `cpus` if given, sleeping
    /// on the doorbell when idle.
    fn msg_gen(
        &self,
        socks: &[PathBuf; 2],
        size: usize,
        window: u64,
        cpus: Option<[u32; 2]>,
    ) -> Result<Totals, String> {
        self.msg_gen_polling(socks, size, window, cpus, None)
    }

    /// As [`msg_gen`](Self::msg_gen); with `poll` the applications busy-poll instead (no
    /// `--blocking`) under `MACHNET_POLL=poll`.
    fn msg_gen_polling(
        &self,
        socks: &[PathBuf; 2],
        size: usize,
        window: u64,
        cpus: Option<[u32; 2]>,
        poll: Option<&str>,
    ) -> Result<Totals, String> {
        let prog = |side: usize| {
            let mut c = match cpus {
                Some(cpus) => {
                    let mut c = Command::new("taskset");
                    c.arg("-c").arg(cpus[side].to_string()).arg(self.bin.join("msg_gen"));
                    c.stdin(Stdio::null());
                    c
                }
                None => self.cmd("msg_gen"),
            };
            c.env("MACHNET_CTRL_SOCK", &socks[side]);
            c.args(["--msg_size", &size.to_string(), "--msg_window", &window.to_string()]);
            match poll {
                None => {
                    c.arg("--blocking");
                }
                Some(p) => {
                    c.env("MACHNET_POLL", p);
                }
            }
            c
        };
        let mut s = prog(1);
        s.args(["--local_ip", "198.18.0.2"]);
        let mut c = prog(0);
        c.args(["--local_ip", "198.18.0.1", "--remote_ip", "198.18.0.2"]);
        self.pair("msg_gen", s, c)
    }

    /// Two `msg_gen --embedded` over memif: server on CPU 1, client on CPU 0.
    fn embedded(&self, size: usize, window: u64, pure_acks: bool) -> Result<Totals, String> {
        self.embedded_with(size, window, pure_acks, &[])
    }

    /// As [`embedded`](Self::embedded), with `extra` flags for both msg_gen.
    fn embedded_with(&self, size: usize, window: u64, pure_acks: bool, extra: &[&str]) -> Result<Totals, String> {
        let sock = self.work.join("emb.sock");
        let _ = std::fs::remove_file(&sock);
        let dev = |role: &str| format!("net_memif0,role={role},id=0,socket={},socket-abstract=no", sock.display());
        let mut s = self.cmd("msg_gen");
        s.args(["--embedded", &dev("server"), "--local_ip", "198.18.0.2", "--cpu", "1"]);
        s.args(["--msg_size", &size.to_string()]);
        let mut c = self.cmd("msg_gen");
        c.args(["--embedded", &dev("client"), "--local_ip", "198.18.0.1", "--remote_ip", "198.18.0.2", "--cpu", "0"]);
        c.args(["--msg_size", &size.to_string(), "--msg_window", &window.to_string()]);
        if pure_acks {
            s.arg("--pure_acks");
            c.arg("--pure_acks");
        }
        s.args(extra);
        c.args(extra);
        self.pair_ready("msg_gen --embedded", s, c, Some(&sock))
    }

    /// Raw memif moving the bytes of `window` messages of `size` in full-size frames (each
    /// carrying what a Machnet DATA frame carries), reported as messages: round trips per
    /// second times the payload of a frame, divided by `size`. No per-message latency.
    fn raw_memif_bulk(&self, size: usize, window: u64) -> Result<Totals, String> {
        let frames = size.div_ceil(RAW_PAYLOAD) as u64;
        // At most 512 frames in flight: 1024 (both ways at once) overruns memif's 1024-slot
        // rings and the ping-pong collapses (measured: 1.5 K against 10 K messages/s of 1 MiB).
        let t = self.raw_memif_frames(1514, (frames * window).min(512))?;
        let rps = t.rps * RAW_PAYLOAD as f64 / size as f64;
        Ok(Totals {
            msg_size: size,
            msg_window: window,
            rps,
            rx_msgs: (rps * t.seconds) as u64,
            rtt_p50_us: f64::NAN,
            rtt_p99_us: f64::NAN,
            rtt_p999_us: f64::NAN,
            rtt_max_us: f64::NAN,
            ..t
        })
    }

    /// Raw memif ping-pong of frames as long as a Machnet frame carrying `size` bytes, server
    /// on CPU 0 and client on CPU 1, both busy-polling.
    fn raw_memif(&self, size: usize, window: u64) -> Result<Totals, String> {
        let t = self.raw_memif_frames((size + 96).clamp(60, 1514), window)?;
        Ok(Totals { msg_size: size, ..t })
    }

    /// Raw memif ping-pong of `frame`-byte frames, `window` in flight.
    fn raw_memif_frames(&self, frame: usize, window: u64) -> Result<Totals, String> {
        let sock = self.work.join("raw.sock");
        let mut s = self.cmd("memif_pingpong");
        s.args(["--role", "server", "--cpu", "0", "--socket"]).arg(&sock);
        s.stdout(Stdio::null()).stderr(Stdio::null());
        let mut srv = Proc::spawn("memif_pingpong server", &mut s)?;
        wait_for(&sock, "memif_pingpong server")?;
        let mut c = self.cmd("memif_pingpong");
        c.args(["--role", "client", "--cpu", "1", "--json", "--warmup", "0.5"])
            .arg("--socket")
            .arg(&sock)
            .args(["--size", &frame.to_string(), "--window", &window.to_string()])
            .arg("--seconds")
            .arg(self.seconds.to_string());
        c.stdout(Stdio::piped()).stderr(Stdio::null());
        let out = Proc::spawn("memif_pingpong client", &mut c)?.finish(Duration::from_secs_f64(self.seconds + 30.0))?;
        // The client tells the server to stop in-band; wait for it.
        let _ = srv.finish_ref(Duration::from_secs(5));
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| format!("no JSON from memif_pingpong:\n{out}"))?;
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad JSON ({e}): {line}"))?;
        let ns = |k: &str| v["rtt_ns"][k].as_f64().unwrap_or(0.0) / 1e3;
        Ok(Totals {
            role: "client".into(),
            msg_size: frame,
            msg_window: window,
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            rx_msgs: v["round_trips"].as_u64().unwrap_or(0),
            rps: v["round_trips_per_s"].as_f64().unwrap_or(0.0),
            rtt_p50_us: ns("p50"),
            rtt_p99_us: ns("p99"),
            rtt_p999_us: ns("p999"),
            rtt_max_us: ns("max"),
            ..Totals::default()
        })
    }
}

/// CPU hogs: `per_cpu` busy shell loops pinned to every CPU, at normal priority, killed when
/// dropped (the conditions of a shared VM or CI runner).
struct Hogs(Vec<Proc>);

impl Hogs {
    fn start(per_cpu: usize) -> Result<Hogs, String> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut v = Vec::new();
        for cpu in 0..cpus {
            for _ in 0..per_cpu {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"]).stdout(Stdio::null());
                v.push(Proc::spawn("CPU hog", &mut c)?);
            }
        }
        Ok(Hogs(v))
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for h in &mut self.0 {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
    }
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn report(records: &[Record], main: &str, gbps: bool) -> String {
    let mut groups: BTreeMap<(usize, u64), BTreeMap<String, Vec<&Record>>> = BTreeMap::new();
    for r in records {
        groups.entry((r.msg_size, r.window)).or_default().entry(r.system.clone()).or_default().push(r);
    }
    let mut s = String::new();
    s.push_str(
        "| size | window | system | RTT p50 µs (min–max) | p99 | p99.9 | K RPC/s (min–max) | p50 × | RPC/s × | frames/RPC | retx per 1K RPC |",
    );
    s.push_str(if gbps { " Gbit/s each way |\n" } else { "\n" });
    s.push_str("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    s.push_str(if gbps { "---:|\n" } else { "\n" });
    for ((size, window), systems) in &groups {
        let stat = |rs: &Vec<&Record>, f: fn(&Totals) -> f64| median_min_max(rs.iter().map(|r| f(&r.totals)).collect());
        let main_p50 = systems.get(main).map(|rs| stat(rs, |t| t.rtt_p50_us).0);
        let main_rps = systems.get(main).map(|rs| stat(rs, |t| t.rps).0);
        let mut names: Vec<&String> = systems.keys().collect();
        names.sort_by_key(|n| (*n != main, n.to_string()));
        for name in names {
            let rs = &systems[name];
            let p50 = stat(rs, |t| t.rtt_p50_us);
            let p99 = stat(rs, |t| t.rtt_p99_us).0;
            let p999 = stat(rs, |t| t.rtt_p999_us).0;
            let rps = stat(rs, |t| t.rps);
            // Ratios: the scenario's system against this row (≥ 1 means the system is better).
            let (rl, rr) = if name == main {
                ("—".to_string(), "—".to_string())
            } else {
                (
                    main_p50.map_or("—".into(), |m| format!("{:.2}", p50.0 / m)),
                    main_rps.map_or("—".into(), |m| format!("{:.2}", m / rps.0)),
                )
            };
            // The client stack's counters, where the system reports them (machnet, not baselines).
            let stacks: Vec<_> = rs.iter().filter_map(|r| r.totals.stack).collect();
            let (fpr, retx) = if stacks.len() == rs.len() {
                let fpr = median_min_max(stacks.iter().map(|x| x.frames_per_rpc).collect()).0;
                let retx = median_min_max(
                    rs.iter()
                        .zip(&stacks)
                        .map(|(r, x)| 1e3 * x.retransmits as f64 / r.totals.rx_msgs.max(1) as f64)
                        .collect(),
                )
                .0;
                (format!("{fpr:.2}"), format!("{retx:.1}"))
            } else {
                ("—".to_string(), "—".to_string())
            };
            // Baselines without a per-message latency (raw memif moving bulk bytes): a dash.
            let lat = if p50.0.is_nan() {
                "— | — | —".to_string()
            } else {
                format!("{:.1} ({:.1}–{:.1}) | {p99:.1} | {p999:.1}", p50.0, p50.1, p50.2)
            };
            let rl = if rl == "NaN" { "—".to_string() } else { rl };
            s.push_str(&format!(
                "| {size} | {window} | {name} | {lat} | {:.1} ({:.1}–{:.1}) | {rl} | {rr} | {fpr} | {retx} |",
                rps.0 / 1e3,
                rps.1 / 1e3,
                rps.2 / 1e3
            ));
            if gbps {
                s.push_str(&format!(" {:.2} |", rps.0 * *size as f64 * 8.0 / 1e9));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!(
        "\nRatios compare {main} with each baseline: `p50 ×` = baseline p50 / {main} p50, `RPC/s ×` = {main} RPC/s / baseline RPC/s (above 1: {main} is better).\n"
    ));
    s
}

fn run(args: &Args) -> Result<(), String> {
    let bin = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .ok_or("no directory for this program")?
            .to_path_buf(),
    };
    for prog in ["machnetd", "msg_gen", "kernel_rpc"] {
        if !bin.join(prog).exists() {
            return Err(format!(
                "{} not found in {} (build with: cargo build --release -p machnet-daemon -p machnet-bench)",
                prog,
                bin.display()
            ));
        }
    }
    let work = std::env::temp_dir().join(format!("machnet-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let env = Env { bin, work: work.clone(), seconds: args.seconds };
    let other = match &args.compare_bin_dir {
        None => None,
        Some(_) if args.scenario != "embedded" => {
            return Err("--compare-bin-dir is for the embedded scenario (S2)".into());
        }
        Some(d) if !d.join("msg_gen").exists() => {
            return Err(format!("--compare-bin-dir: no msg_gen in {}", d.display()));
        }
        Some(d) => {
            Some((Env { bin: d.clone(), work: work.clone(), seconds: args.seconds }, args.compare_label.clone()))
        }
    };
    let main = match args.scenario.as_str() {
        "udp" => "machnet udp backend",
        "memif" => "machnet memif (DPDK)",
        "embedded" => "machnet embedded, memif",
        "busy" => "machnet udp, Swift, busy host",
        "shared" => "machnet udp, spinning app, MACHNET_POLL=adaptive",
        "bulk" => "machnet embedded, memif",
        other => return Err(format!("unknown scenario {other:?} (known: udp, memif, embedded, bulk, busy, shared)")),
    };
    let bulk = args.scenario == "bulk";
    let sizes =
        args.sizes.clone().unwrap_or_else(|| if bulk { vec![65_536, 1 << 20, 8 << 20] } else { vec![64, 1024] });
    let windows = args.windows.clone().unwrap_or_else(|| if bulk { vec![1, 8] } else { vec![1, 32] });
    if let Some(s) = sizes.iter().find(|&&s| !(9..=8 << 20).contains(&s)) {
        return Err(format!("--sizes: {s} is out of range 9..=8388608 (a Machnet message is at most 8 MiB)"));
    }
    if windows.contains(&0) {
        return Err("--windows: 0 is not a window (at least 1)".into());
    }
    let busy = args.scenario == "busy";
    let shared = args.scenario == "shared";
    let embedded = args.scenario == "embedded";
    let memif = args.scenario == "memif" || embedded || bulk;
    if memif && !env.bin.join("memif_pingpong").exists() {
        return Err("memif_pingpong not found: build with --features machnet-daemon/dpdk,machnet-bench/dpdk".into());
    }
    eprintln!("machine: {}", machnet_bench::machine_summary());
    let mut records = Vec::new();
    let result = (|| -> Result<(), String> {
        for run in 0..args.runs {
            let mut measure = |system: &str,
                               size: usize,
                               window: u64,
                               t: Result<Totals, String>|
             -> Result<(), String> {
                let t = t.map_err(|e| format!("{system}, {size} B, window {window}: {e}"))?;
                eprintln!(
                    "run {run} {size:>5} B w{window:<3} {system:<28} p50 {:>8.1} µs  p99 {:>8.1}  p99.9 {:>8.1}  {:>9.1} K RPC/s",
                    t.rtt_p50_us,
                    t.rtt_p99_us,
                    t.rtt_p999_us,
                    t.rps / 1e3
                );
                records.push(Record { system: system.into(), msg_size: size, window, run, totals: t });
                Ok(())
            };
            // The system under test, then (with its daemons stopped) the baselines.
            if busy {
                // Hogs for the whole measurement of both configurations.
                let _hogs = Hogs::start(2)?;
                for (system, transport) in
                    [(main, ""), ("machnet udp, Fixed(32), busy host", r#"{"cc": "fixed", "fixed_window": 32}"#)]
                {
                    let (mut daemons, socks) = env.udp_daemons(transport)?;
                    for &size in &sizes {
                        for &window in &windows {
                            measure(system, size, window, env.msg_gen(&socks, size, window, Some([0, 1])))?;
                        }
                    }
                    for d in &mut daemons {
                        d.interrupt();
                    }
                }
                continue;
            }
            if shared {
                let (mut daemons, socks) = env.udp_daemons("")?;
                for &size in &sizes {
                    for &window in &windows {
                        for (system, poll) in [
                            (main, Some("adaptive")),
                            ("machnet udp, spinning app, MACHNET_POLL=spin", Some("spin")),
                            ("machnet udp, --blocking app", None),
                        ] {
                            measure(
                                system,
                                size,
                                window,
                                env.msg_gen_polling(&socks, size, window, Some([0, 1]), poll),
                            )?;
                        }
                    }
                }
                for d in &mut daemons {
                    d.interrupt();
                }
                continue;
            }
            if bulk {
                for &size in &sizes {
                    for &window in &windows {
                        measure(main, size, window, env.embedded(size, window, false))?;
                        // The same with a constant 256-packet window (the transport's flow
                        // window) instead of Swift: how much the congestion window limits.
                        let fixed = "machnet embedded, Fixed(256)";
                        measure(
                            fixed,
                            size,
                            window,
                            env.embedded_with(size, window, false, &["--fixed_window", "256"]),
                        )?;
                    }
                }
                let (mut daemons, socks) = env.memif_daemons()?;
                for &size in &sizes {
                    for &window in &windows {
                        measure("machnet memif (DPDK)", size, window, env.msg_gen(&socks, size, window, Some([0, 1])))?;
                    }
                }
                for d in &mut daemons {
                    d.interrupt();
                }
                drop(daemons);
                if !args.no_baselines {
                    for &size in &sizes {
                        for &window in &windows {
                            measure("raw memif, same bytes", size, window, env.raw_memif_bulk(size, window))?;
                            measure("kernel TCP, blocking", size, window, env.kernel("tcp", false, size, window))?;
                        }
                    }
                }
                continue;
            }
            if embedded {
                for &size in &sizes {
                    for &window in &windows {
                        measure(main, size, window, env.embedded(size, window, false))?;
                        if let Some((o, label)) = &other {
                            let name = format!("machnet embedded, memif, {label}");
                            measure(&name, size, window, o.embedded(size, window, false))?;
                        }
                        // The same stack without ACKs in DATA: what they save, in this run.
                        let pure = "machnet embedded, pure ACKs";
                        measure(pure, size, window, env.embedded(size, window, true))?;
                    }
                }
            } else {
                let (mut daemons, socks) = if memif { env.memif_daemons()? } else { env.udp_daemons("")? };
                // Each application on its daemon's CPU (on this 2-core machine: one daemon and one
                // application per core).
                let cpus = Some([0, 1]);
                for &size in &sizes {
                    for &window in &windows {
                        measure(main, size, window, env.msg_gen(&socks, size, window, cpus))?;
                    }
                }
                // Both at once: a memif peer must not poll while the other unmaps the rings.
                for d in &mut daemons {
                    d.interrupt();
                }
                drop(daemons);
            }
            if args.no_baselines {
                continue;
            }
            for &size in &sizes {
                for &window in &windows {
                    if memif {
                        measure("raw memif, no protocol", size, window, env.raw_memif(size, window))?;
                    }
                    // A message beyond one datagram has no kernel UDP baseline (kernel_rpc refuses it).
                    if size <= KERNEL_UDP_MAX_MSG {
                        measure("kernel UDP, blocking", size, window, env.kernel("udp", false, size, window))?;
                        measure("kernel UDP, busy-poll", size, window, env.kernel("udp", true, size, window))?;
                    }
                    measure("kernel TCP, blocking", size, window, env.kernel("tcp", false, size, window))?;
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    println!("{}", report(&records, main, bulk));
    if let Some(out) = &args.out {
        let doc = serde_json::json!({
            "scenario": args.scenario,
            "machine": machnet_bench::machine_summary(),
            "seconds": args.seconds,
            "runs": args.runs,
            "records": records,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc).expect("serialisable"))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("scenario: {e}");
        std::process::exit(1);
    }
}
