//! Prometheus metrics: `machnetd --metrics-addr 127.0.0.1:PORT` (or `machnet_rs.metrics_addr`)
//! serves the text exposition format (version 0.0.4) at `/metrics`.
//!
//! Everything here runs on the controller thread, never on a shard: a scrape renders the same
//! statistics document `machnetctl` reads ([`Controller::stats_json`]), from the snapshots the
//! shards publish. The HTTP side is a minimal HTTP/1.0 and 1.1 responder on a non-blocking
//! `TcpListener`: one request per connection, answered with `Connection: close`; a client that
//! sends nothing, or a request larger than [`MAX_REQUEST`], is dropped after [`REQUEST_TIMEOUT`]
//! or at once, so no client can hold the controller up. The metric names are stable and listed
//! in docs/operations.md ("Metrics").

use crate::controller::{Controller, STATS_CHANNELS, STATS_FLOWS};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Longest request head a client may send.
pub const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNS: usize = 16;
/// The exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Conn {
    stream: TcpStream,
    req: Vec<u8>,
    /// The answer once the request is complete, and how much of it went out.
    out: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The metrics endpoint: a listener and the connections being served.
pub struct MetricsServer {
    listener: TcpListener,
    conns: Vec<Conn>,
    /// Scrapes answered (`/metrics` with 200).
    scrapes: u64,
}

impl MetricsServer {
    /// Listens on `addr` (port 0: any free port, see [`local_addr`](Self::local_addr)).
    pub fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(MetricsServer { listener, conns: Vec::new(), scrapes: 0 })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Descriptors whose readability means work for [`poll`](Self::poll): the listener and
    /// every connection still sending its request.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listener.as_raw_fd()];
        v.extend(self.conns.iter().filter(|c| c.out.is_none()).map(|c| c.stream.as_raw_fd()));
        v
    }

    /// Whether an answer is still going out (the caller should poll again soon: writability is
    /// not among [`fds`](Self::fds)).
    pub fn writing(&self) -> bool {
        self.conns.iter().any(|c| c.out.is_some())
    }

    /// Accepts, reads, answers and closes whatever is ready; never blocks.
    pub fn poll(&mut self, controller: &Controller) {
        while self.conns.len() < MAX_CONNS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.conns.push(Conn {
                            stream,
                            req: Vec::new(),
                            out: None,
                            deadline: Instant::now() + REQUEST_TIMEOUT,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.conns.len() {
            let keep = now < self.conns[i].deadline && self.serve(i, controller);
            if keep {
                i += 1;
            } else {
                self.conns.swap_remove(i);
            }
        }
    }

    /// Moves connection `i` on; false when it is finished (answered or broken).
    fn serve(&mut self, i: usize, controller: &Controller) -> bool {
        if self.conns[i].out.is_none() {
            let c = &mut self.conns[i];
            let mut buf = [0u8; 2048];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => c.req.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
                if c.req.len() > MAX_REQUEST {
                    break;
                }
            }
            let answer = match head_end(&c.req) {
                Some(end) => {
                    let req = std::mem::take(&mut self.conns[i].req);
                    self.answer(&req[..end], controller)
                }
                None if self.conns[i].req.len() > MAX_REQUEST => {
                    response(431, "Request Header Fields Too Large", "text/plain", b"request too large\n", true)
                }
                None => return true,
            };
            self.conns[i].out = Some((answer, 0));
        }
        let c = &mut self.conns[i];
        let Some((out, sent)) = c.out.as_mut() else { return true };
        while *sent < out.len() {
            match c.stream.write(&out[*sent..]) {
                Ok(0) => return false,
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        false
    }

    /// The response to a complete request head.
    fn answer(&mut self, head: &[u8], controller: &Controller) -> Vec<u8> {
        let text = String::from_utf8_lossy(head);
        let mut words = text.lines().next().unwrap_or("").split_whitespace();
        let (method, target, version) = (words.next(), words.next(), words.next());
        if !version.is_some_and(|v| v.starts_with("HTTP/1.")) || words.next().is_some() {
            return response(400, "Bad Request", "text/plain", b"expected an HTTP/1.x request line\n", true);
        }
        let body_wanted = match method {
            Some("GET") => true,
            Some("HEAD") => false,
            _ => return response(405, "Method Not Allowed", "text/plain", b"GET or HEAD\n", true),
        };
        let path = target.unwrap_or("").split('?').next().unwrap_or("");
        match path {
            "/metrics" => {
                self.scrapes += 1;
                let doc = controller.stats_json(STATS_FLOWS | STATS_CHANNELS);
                let body = render(&doc, self.scrapes);
                response(200, "OK", CONTENT_TYPE, body.as_bytes(), body_wanted)
            }
            "/" => response(200, "OK", "text/plain", b"machnetd: metrics at /metrics\n", body_wanted),
            _ => response(404, "Not Found", "text/plain", b"not found: try /metrics\n", body_wanted),
        }
    }
}

/// Where the request head ends (after the blank line), if it has.
fn head_end(req: &[u8]) -> Option<usize> {
    let crlf = req.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = req.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn response(code: u16, reason: &str, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

/// How a sample's value is read from the statistics document.
#[derive(Clone, Copy)]
enum Src {
    /// A JSON pointer, times a scale (µs to seconds and the like).
    At(&'static str, f64),
    /// Computed.
    F(fn(&Value) -> Option<f64>),
}

impl Src {
    fn read(self, v: &Value) -> Option<f64> {
        match self {
            Src::At(p, scale) => v.pointer(p).and_then(Value::as_f64).map(|x| x * scale),
            Src::F(f) => f(v),
        }
    }
}

/// One sample of a family: its extra labels and where its value comes from.
type Sample = (&'static [(&'static str, &'static str)], Src);

/// A metric family: name, type, help, and its samples per object (shard, channel).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: &'static [Sample],
}

const fn at(p: &'static str) -> Src {
    Src::At(p, 1.0)
}

const fn fam(name: &'static str, kind: &'static str, help: &'static str, samples: &'static [Sample]) -> Family {
    Family { name, kind, help, samples }
}

const C: &str = "counter";
const G: &str = "gauge";

fn stage_sum(sh: &Value, key: &str) -> f64 {
    sh["stages"].as_array().into_iter().flatten().filter_map(|s| s[key].as_f64()).fold(0.0, |a, b| a + b)
}

/// Per shard (label `shard`), from `shards[i]` of the document.
static SHARD: &[Family] = &[
    fam("machnet_shard_info", G, "A shard and the CPU core it is pinned to (-1: not pinned); value 1.", &[(&[], Src::F(|_| Some(1.0)))]),
    fam("machnet_shard_uptime_seconds", G, "Time since the shard thread started.", &[(&[], at("/uptime_s"))]),
    fam("machnet_shard_rx_packets_total", C, "Machnet packets received (handed to the transport).", &[(&[], at("/endpoint/rx_packets"))]),
    fam("machnet_shard_tx_packets_total", C, "Machnet packets sent, by kind (data: first transmissions; retransmit: data sent again, tail probes included).", &[
        (&[("kind", "data")], at("/endpoint/tx_data")),
        (&[("kind", "retransmit")], at("/endpoint/tx_retransmits")),
        (&[("kind", "ack")], at("/endpoint/tx_acks")),
        (&[("kind", "rst")], at("/endpoint/tx_rsts")),
    ]),
    fam("machnet_shard_rx_messages_total", C, "Messages delivered to applications.", &[(&[], at("/endpoint/rx_messages"))]),
    fam("machnet_shard_rx_bytes_total", C, "Message bytes delivered to applications (payload, not frame bytes).", &[(&[], at("/endpoint/rx_bytes"))]),
    fam("machnet_shard_tx_messages_total", C, "Messages accepted from applications for sending.", &[(&[], at("/endpoint/tx_messages"))]),
    fam("machnet_shard_tx_bytes_total", C, "Message bytes accepted for sending (payload, not frame bytes).", &[(&[], at("/endpoint/tx_bytes"))]),
    fam("machnet_shard_retransmits_total", C, "Data frames sent again (loss recovery, timeouts and tail-loss probes).", &[(&[], at("/endpoint/tx_retransmits"))]),
    fam("machnet_shard_rto_total", C, "Retransmission timeouts, by outcome (spurious: the acknowledgement was late, the timeout undone).", &[
        (&[("kind", "fired")], at("/endpoint/rto_fired")),
        (&[("kind", "spurious")], at("/endpoint/spurious_rto")),
    ]),
    fam("machnet_shard_fast_recoveries_total", C, "Fast recoveries entered.", &[(&[], at("/endpoint/fast_recoveries"))]),
    fam("machnet_shard_drops_total", C, "Frames and packets dropped, by reason.", &[
        (&[("reason", "rx_unparsed")], at("/counters/rx_dropped")),
        (&[("reason", "rx_not_for_us")], at("/endpoint/rx_not_for_us")),
        (&[("reason", "rx_no_flow")], at("/endpoint/rx_no_flow")),
        (&[("reason", "rx_duplicate")], at("/endpoint/rx_duplicate")),
        (&[("reason", "rx_out_of_window")], at("/endpoint/rx_out_of_window")),
        (&[("reason", "rx_no_buffer")], at("/endpoint/rx_no_buffer")),
        (&[("reason", "rx_bad_length")], at("/endpoint/rx_bad_length")),
        (&[("reason", "rx_bad_framing")], at("/endpoint/rx_bad_framing")),
        (&[("reason", "rx_bad_ack")], at("/endpoint/rx_bad_ack")),
        (&[("reason", "rx_unknown_type")], at("/endpoint/rx_unknown_type")),
        (&[("reason", "rx_unexpected")], at("/endpoint/rx_unexpected")),
        (&[("reason", "rx_unproven_data")], at("/endpoint/rx_unproven_data")),
        (&[("reason", "rx_rst_ignored")], at("/endpoint/rx_rst_ignored")),
        (&[("reason", "rx_orphaned")], at("/counters/rx_orphaned")),
        (&[("reason", "syn_table_full")], at("/endpoint/syn_table_full")),
        (&[("reason", "syn_source_limited")], at("/endpoint/syn_source_limited")),
        (&[("reason", "syn_evicted")], at("/endpoint/syn_evicted")),
        (&[("reason", "tx_device_full")], at("/counters/tx_dropped")),
        (&[("reason", "tx_no_buffer")], at("/endpoint/tx_no_buffer")),
        (&[("reason", "handoff_ring_full")], at("/counters/handoff_dropped")),
    ]),
    fam("machnet_shard_sends_refused_total", C, "Application messages refused, by reason (not_owner: not the sender's flow; transport: flow not established or bad size).", &[
        (&[("reason", "not_owner")], at("/counters/tx_refused")),
        (&[("reason", "transport")], at("/counters/tx_rejected")),
    ]),
    fam("machnet_shard_handoffs_total", C, "Frames and ARP mappings handed to (out) and from (in) other shards.", &[
        (&[("direction", "out")], at("/counters/handoff_sent")),
        (&[("direction", "in")], at("/counters/handoff_received")),
    ]),
    fam("machnet_shard_loops_total", C, "Run-to-completion loops of the shard.", &[(&[], at("/loops"))]),
    fam("machnet_shard_idle_loops_total", C, "Loops in which no stage had work.", &[(&[], at("/idle_loops"))]),
    fam("machnet_shard_parks_total", C, "Times the shard slept on its doorbell (adaptive idle).", &[(&[], at("/parks"))]),
    fam("machnet_shard_stalls_total", C, "Loops that took longer than the stall threshold.", &[(&[], at("/stalls"))]),
    fam("machnet_shard_busy_ratio", G, "Share of the stages' time spent doing work, since start (1: saturated).", &[(&[], Src::F(|sh| {
        let busy = stage_sum(sh, "busy_ns");
        Some(busy / (busy + stage_sum(sh, "idle_ns")).max(1.0))
    }))]),
    fam("machnet_shard_parked_ratio", G, "Share of the shard's time spent parked, since start.", &[(&[], at("/parked_share"))]),
    fam("machnet_shard_max_loop_seconds", G, "The longest loop since start.", &[(&[], Src::At("/max_loop_us", 1e-6))]),
    fam("machnet_shard_cpu_seconds_total", C, "CPU time of the shard thread.", &[(&[], at("/cpu_s"))]),
    fam("machnet_shard_runqueue_seconds_total", C, "Time the shard thread was runnable but waited for a CPU.", &[(&[], at("/runqueue_s"))]),
    fam("machnet_shard_channels", G, "Channels the shard serves.", &[(&[], at("/channels"))]),
    fam("machnet_shard_flows", G, "Flows on the shard.", &[(&[], at("/flows"))]),
    fam("machnet_shard_half_open_flows", G, "Half-open flows (handshake not finished) on the shard.", &[(&[], at("/half_open"))]),
    fam("machnet_shard_syn_cookies_accepted_total", C, "Server flows rebuilt from the client's final ACK or first DATA (a SYN cookie) after a flood had evicted their half-open flow.", &[(&[], at("/endpoint/syn_cookies_accepted"))]),
    fam("machnet_shard_flow_events_total", C, "Flow life-cycle events (opened: both directions).", &[
        (&[("event", "opened")], at("/endpoint/flows_opened")),
        (&[("event", "failed")], at("/endpoint/flows_failed")),
        (&[("event", "connect_refused")], at("/endpoint/connect_refused")),
        (&[("event", "connect_timeout")], at("/endpoint/connect_timeouts")),
        (&[("event", "accept_timeout")], at("/endpoint/accept_timeouts")),
    ]),
];

/// Per stage of a shard (labels `shard`, `stage`), from `shards[i].stages[j]`.
static STAGE: &[Family] = &[
    fam("machnet_stage_polls_total", C, "Polls of the stage.", &[(&[], at("/polls"))]),
    fam("machnet_stage_work_total", C, "Work items the stage did.", &[(&[], at("/work"))]),
    fam(
        "machnet_stage_busy_seconds_total",
        C,
        "Time in polls of the stage that did work (sampled: one loop in 16 is timed, scaled).",
        &[(&[], Src::At("/busy_ns", 1e-9))],
    ),
    fam(
        "machnet_stage_idle_seconds_total",
        C,
        "Time in polls of the stage that found nothing (sampled likewise).",
        &[(&[], Src::At("/idle_ns", 1e-9))],
    ),
    fam(
        "machnet_stage_max_poll_seconds",
        G,
        "The longest timed poll of the stage.",
        &[(&[], Src::At("/max_poll_ns", 1e-9))],
    ),
    fam("machnet_stage_stalls_total", C, "Polls of the stage past the stall threshold.", &[(&[], at("/stalls"))]),
];

/// Per channel (labels `channel`, `app`, `pid`, `shard`), from `channels[i]`.
static CHANNEL: &[Family] = &[
    fam("machnet_channel_messages_total", C, "Messages through the channel, by direction (tx: from the application).", &[
        (&[("direction", "tx")], at("/tx_msgs")),
        (&[("direction", "rx")], at("/rx_msgs")),
    ]),
    fam("machnet_channel_bytes_total", C, "Message bytes through the channel, by direction.", &[
        (&[("direction", "tx")], at("/tx_bytes")),
        (&[("direction", "rx")], at("/rx_bytes")),
    ]),
    fam("machnet_channel_buffers", G, "Buffers of the channel's pools (direction) held by the application or the engine, and the pools' sizes (holder=\"all\").", &[
        (&[("direction", "tx"), ("holder", "app")], at("/tx_app")),
        (&[("direction", "tx"), ("holder", "engine")], at("/tx_engine")),
        (&[("direction", "tx"), ("holder", "all")], at("/tx_bufs")),
        (&[("direction", "rx"), ("holder", "app")], at("/rx_app")),
        (&[("direction", "rx"), ("holder", "engine")], at("/rx_engine")),
        (&[("direction", "rx"), ("holder", "all")], at("/rx_bufs")),
    ]),
    fam("machnet_channel_rx_full_total", C, "Deliveries refused because the application's receive ring was full.", &[(&[], at("/rx_full"))]),
    fam("machnet_channel_sends_refused_total", C, "Sends refused (not the channel's flow, or the transport refused).", &[(&[], at("/refused"))]),
    fam("machnet_channel_violations_total", C, "Protocol violations by the application on this channel.", &[(&[], at("/violations"))]),
    fam("machnet_channel_app_slow", G, "1 if the application's receive ring was full at the last delivery.", &[(&[], Src::F(|c| c["blocked"].as_bool().map(f64::from)))]),
    fam("machnet_channel_draining", G, "1 if the application detached the channel and its flows are finishing.", &[(&[], Src::F(|c| c["lingering"].as_bool().map(f64::from)))]),
];

/// The exposition of the statistics document `doc` ([`Controller::stats_json`] with flows and
/// channels); `scrapes` is this scrape's number.
pub fn render(doc: &Value, scrapes: u64) -> String {
    let mut x = Exposition::default();
    let st = &doc["status"];
    let label = |k: &str| st[k].as_str().unwrap_or("").to_string();
    x.head("machnet_info", G, "The daemon: version, address, MAC and backend; value 1.");
    x.sample(
        "machnet_info",
        &[
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("ip", label("ip")),
            ("mac", label("mac")),
            ("backend", label("backend")),
            ("idle", label("idle")),
        ],
        1.0,
    );
    for (name, kind, help, key) in [
        ("machnet_uptime_seconds", G, "Time since machnetd started.", "uptime_s"),
        ("machnet_shards", G, "Engine shards.", "shards"),
        ("machnet_apps", G, "Registered applications.", "apps"),
        ("machnet_channels", G, "Channels served.", "channels"),
        ("machnet_flows", G, "Flows (every state) on all shards.", "flows"),
        (
            "machnet_access_refused_total",
            C,
            "Registrations and statistics requests refused by the access list.",
            "access_refused",
        ),
        ("machnet_heap_bytes", G, "Bytes the allocator has handed out and not had back.", "heap_bytes"),
    ] {
        x.head(name, kind, help);
        x.sample(name, &[], st[key].as_f64().unwrap_or(0.0));
    }
    x.head("machnet_metrics_scrapes_total", C, "Scrapes of /metrics answered, this one included.");
    x.sample("machnet_metrics_scrapes_total", &[], scrapes as f64);

    let shards = doc["shards"].as_array().map(Vec::as_slice).unwrap_or_default();
    let shard_labels = |sh: &Value| {
        let mut l = vec![("shard", sh["index"].to_string())];
        if sh["core"].is_null() {
            l.push(("core", "-1".into()));
        } else {
            l.push(("core", sh["core"].to_string()));
        }
        l
    };
    for f in SHARD {
        x.head(f.name, f.kind, f.help);
        for sh in shards {
            let mut labels = shard_labels(sh);
            if f.name != "machnet_shard_info" {
                labels.truncate(1);
            }
            x.samples(f, sh, &labels);
        }
    }
    for f in STAGE {
        x.head(f.name, f.kind, f.help);
        for sh in shards {
            for stage in sh["stages"].as_array().into_iter().flatten() {
                let labels =
                    [("shard", sh["index"].to_string()), ("stage", stage["name"].as_str().unwrap_or("").to_string())];
                x.samples(f, stage, &labels);
            }
        }
    }
    let violations = "machnet_shard_violations_total";
    x.head(violations, C, "Channel protocol violations by reason (each closes its channel).");
    for sh in shards {
        for (reason, n) in sh["counters"]["violations"].as_object().into_iter().flatten() {
            x.sample(
                violations,
                &[("shard", sh["index"].to_string()), ("reason", reason.clone())],
                n.as_f64().unwrap_or(0.0),
            );
        }
    }

    let channels = doc["channels"].as_array().map(Vec::as_slice).unwrap_or_default();
    for f in CHANNEL {
        x.head(f.name, f.kind, f.help);
        for c in channels {
            let labels = [
                ("channel", c["id"].to_string()),
                ("app", c["app"].to_string()),
                ("pid", if c["pid"].is_null() { String::new() } else { c["pid"].to_string() }),
                ("shard", c["shard"].to_string()),
            ];
            x.samples(f, c, &labels);
        }
    }
    let apps = "machnet_app_channels";
    x.head(apps, G, "Channels of each registered application.");
    for a in doc["apps"].as_array().into_iter().flatten() {
        let n = a["channels"].as_array().map_or(0, Vec::len);
        let labels = [("app", a["id"].to_string()), ("pid", a["pid"].to_string()), ("uid", a["uid"].to_string())];
        x.sample(apps, &labels, n as f64);
    }

    // Flow totals: per state, and what all flows hold, summed (a per-flow series would grow
    // without bound on a busy server).
    let flows = doc["flows"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut states: Vec<(&str, u64)> = Vec::new();
    for f in flows {
        let s = f["state"].as_str().unwrap_or("unknown");
        match states.iter_mut().find(|(n, _)| *n == s) {
            Some((_, k)) => *k += 1,
            None => states.push((s, 1)),
        }
    }
    states.sort();
    x.head("machnet_flows_by_state", G, "Flows by state.");
    for (s, n) in states {
        x.sample("machnet_flows_by_state", &[("state", s.to_string())], n as f64);
    }
    let sum = |k: &str| flows.iter().filter_map(|f| f[k].as_f64()).fold(0.0, |a, b| a + b);
    for (name, kind, help, key) in [
        ("machnet_flows_in_flight_packets", G, "Packets sent and not yet acknowledged, all open flows.", "in_flight"),
        ("machnet_flows_queued_messages", G, "Messages waiting to be sent, all open flows.", "queued"),
        ("machnet_flows_retransmits", G, "Retransmissions of the open flows (closed flows leave this sum; machnet_shard_retransmits_total keeps counting).", "retransmits"),
    ] {
        x.head(name, kind, help);
        x.sample(name, &[], sum(key));
    }
    x.out
}

/// The text being built.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let esc = val.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{esc}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }

    /// The samples of family `f` for one object `v` with `labels`.
    fn samples(&mut self, f: &Family, v: &Value, labels: &[(&str, String)]) {
        for &(extra, src) in f.samples {
            let Some(value) = src.read(v) else { continue };
            let mut l = labels.to_vec();
            l.extend(extra.iter().map(|&(k, val)| (k, val.to_string())));
            self.sample(f.name, &l, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_family_has_help_and_type_before_its_samples_and_labels_are_escaped() {
        let doc = json!({
            "status": {"ip": "198.18.0.1", "mac": "02:00:00:00:00:01", "backend": "udp", "idle": "a\"b\\c",
                       "uptime_s": 1.5, "shards": 1, "apps": 1, "channels": 1, "flows": 1, "access_refused": 0, "heap_bytes": 10},
            "shards": [{"index": 0, "core": null, "uptime_s": 1.0, "loops": 5, "stages": [{"name": "rx", "busy_ns": 3, "idle_ns": 1}],
                        "endpoint": {"rx_packets": 7}, "counters": {"violations": {"BadIndex": 0}}}],
            "channels": [{"id": 1, "app": 2, "pid": 3, "shard": 0, "tx_msgs": 4, "blocked": false}],
            "apps": [{"id": 2, "pid": 3, "uid": 0, "channels": [1]}],
            "flows": [{"state": "Established", "in_flight": 2}],
        });
        let text = render(&doc, 1);
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(typed.insert(rest.split(' ').next().unwrap().to_string()), "family typed twice: {line}");
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "sample before its TYPE line: {line}");
            }
        }
        assert!(text.contains("machnet_shard_rx_packets_total{shard=\"0\"} 7\n"), "{text}");
        assert!(text.contains("machnet_shard_busy_ratio{shard=\"0\"} 0.75\n"), "{text}");
        assert!(text.contains("idle=\"a\\\"b\\\\c\""), "{text}");
        assert!(text.contains(
            "machnet_channel_messages_total{channel=\"1\",app=\"2\",pid=\"3\",shard=\"0\",direction=\"tx\"} 4\n"
        ));
        assert!(text.contains("machnet_flows_by_state{state=\"Established\"} 1\n"));
    }

    #[test]
    fn request_heads_end_at_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n"), None);
    }
}
