//! The Prometheus endpoint (`machnet_rs.metrics_addr`, `--metrics-addr`): scraped during
//! traffic by a real client and parser (`prometheus_client`, Debian's python3-prometheus-client),
//! its counters move with the traffic, and no HTTP client can hold up the controller.

mod common;

use common::*;
use machnet::testing::process::output_within;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Scrapes `url` with urllib and parses it with `prometheus_client`'s own parser.
const SCRAPE_PY: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
r = urllib.request.urlopen(sys.argv[1], timeout=20)
text = r.read().decode()
fams = [{"name": f.name, "type": f.type, "help": f.documentation,
         "samples": [[s.name, s.labels, s.value] for s in f.samples]}
        for f in text_string_to_metric_families(text)]
print(json.dumps({"content_type": r.headers.get("Content-Type"), "families": fams}))
"#;

/// The address the daemon logged it serves metrics on.
fn metrics_addr(d: &Daemon) -> String {
    let needle = "metrics: serving http://";
    assert!(d.wait_log(needle, Duration::from_secs(10)), "no metrics line in the log:\n{}", d.log_text());
    let log = d.log_text();
    let rest = &log[log.find(needle).unwrap() + needle.len()..];
    rest[..rest.find("/metrics").unwrap()].to_string()
}

/// Debian's python, which sees apt's modules (a pyenv python3 earlier on PATH does not).
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

struct Scrape {
    content_type: String,
    families: Vec<Value>,
}

impl Scrape {
    fn take(addr: &str) -> Scrape {
        let url = format!("http://{addr}/metrics");
        let out = output_within(
            Command::new(python()).arg("-c").arg(SCRAPE_PY).arg(&url),
            RUN,
            "a prometheus_client scrape of /metrics",
        );
        assert!(
            out.status.success(),
            "scraping {url} failed (is python3-prometheus-client installed? scripts/setup.sh test):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).expect("the scrape script's JSON");
        Scrape {
            content_type: doc["content_type"].as_str().unwrap_or("").to_string(),
            families: doc["families"].as_array().unwrap().clone(),
        }
    }

    /// The value of sample `name` whose labels include `labels`; fails if there is none.
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        for f in &self.families {
            for s in f["samples"].as_array().unwrap() {
                if s[0] == name && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(v)) {
                    return s[2].as_f64().unwrap();
                }
            }
        }
        panic!("no sample {name} with labels {labels:?} in the scrape")
    }
}

#[test]
fn metrics_parse_and_their_counters_move_with_traffic() {
    let (a, b) = Daemon::pair_with(r#", "metrics_addr": "127.0.0.1:0""#, "");
    let addr = metrics_addr(&a);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(!b.log_text().contains("metrics: serving"), "metrics are off unless configured");

    // One echo more than the scrapes' traffic: the flow stays open until the last one.
    let server = echo_server_on(&b, 7100, 201);
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let channel = ch.id().expect("a channel from the daemon").to_string();
    let flow = ch.connect(IP_A, IP_B, 7100).unwrap();
    ping_pong(&mut ch, flow, 1, 1000, 100, 4);
    let s1 = Scrape::take(&addr);
    ping_pong(&mut ch, flow, 2, 1000, 100, 4);
    let s2 = Scrape::take(&addr);
    ping_pong(&mut ch, flow, 3, 1000, 1, 1);
    assert_eq!(server.join().unwrap(), 201);

    assert!(s1.content_type.starts_with("text/plain; version=0.0.4"), "{}", s1.content_type);
    // Every family has its help and a type; the names the documentation promises are there.
    for f in &s2.families {
        assert!(!f["help"].as_str().unwrap_or("").is_empty(), "{} has no HELP", f["name"]);
        assert!(["counter", "gauge"].contains(&f["type"].as_str().unwrap()), "{} is untyped", f["name"]);
    }
    let doc = include_str!("../../docs/operations.md");
    for f in &s2.families {
        let name = f["name"].as_str().unwrap();
        let full = if f["type"] == "counter" { format!("{name}_total") } else { name.to_string() };
        assert!(doc.contains(&format!("`{full}`")), "{full} is not documented in docs/operations.md");
    }

    let shard = [("shard", "0")];
    let rx = |s: &Scrape| s.value("machnet_shard_rx_packets_total", &shard);
    assert!(rx(&s1) >= 100.0 && rx(&s2) >= rx(&s1) + 100.0, "rx packets {} then {}", rx(&s1), rx(&s2));
    let data = |s: &Scrape| s.value("machnet_shard_tx_packets_total", &[("shard", "0"), ("kind", "data")]);
    assert!(data(&s2) >= data(&s1) + 100.0, "data packets {} then {}", data(&s1), data(&s2));
    let bytes = |s: &Scrape| s.value("machnet_shard_tx_bytes_total", &shard);
    assert_eq!(bytes(&s2) - bytes(&s1), 100_000.0, "message bytes sent between the scrapes");
    let msgs = |s: &Scrape, dir: &str| {
        s.value("machnet_channel_messages_total", &[("channel", channel.as_str()), ("direction", dir)])
    };
    assert_eq!((msgs(&s1, "tx"), msgs(&s1, "rx")), (100.0, 100.0), "the client channel's messages");
    assert_eq!((msgs(&s2, "tx"), msgs(&s2, "rx")), (200.0, 200.0), "the client channel's messages");
    assert_eq!(s2.value("machnet_flows_by_state", &[("state", "Established")]), 1.0);
    assert_eq!(s2.value("machnet_flows", &[]), 1.0);
    assert_eq!(s2.value("machnet_app_channels", &[("pid", &std::process::id().to_string())]), 1.0);
    let busy = s2.value("machnet_shard_busy_ratio", &shard);
    assert!((0.0..=1.0).contains(&busy), "busy ratio {busy}");
    assert!(s2.value("machnet_shard_loops_total", &shard) > s1.value("machnet_shard_loops_total", &shard));
    assert!(s2.value("machnet_stage_work_total", &shard) > 0.0);
    assert_eq!(s2.value("machnet_shard_drops_total", &[("shard", "0"), ("reason", "rx_bad_ack")]), 0.0);
    assert_eq!(s2.value("machnet_metrics_scrapes_total", &[]) - s1.value("machnet_metrics_scrapes_total", &[]), 1.0);
    assert_eq!(s2.value("machnet_info", &[("ip", "198.18.0.1"), ("backend", "udp")]), 1.0);
}

/// Sends `req` raw and returns the whole answer (the server closes after it), within 20 s.
fn raw(addr: &str, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(req).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("an answer, then the connection closed, within 20 s");
    out
}

#[test]
fn a_silent_or_malformed_http_client_never_holds_up_the_controller() {
    let (a, _b) = Daemon::pair(r#", "metrics_addr": "127.0.0.1:0""#);
    let addr = metrics_addr(&a);
    // A client that connects and says nothing: the control socket is still served at once.
    let silent = TcpStream::connect(&addr).unwrap();
    let half = TcpStream::connect(&addr).unwrap();
    (&half).write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let st = ctl_json(&a.sock, "status");
    assert_eq!(st["status"]["ip"], "198.18.0.1");
    assert!(t.elapsed() < Duration::from_secs(5), "machnetctl status took {:?} beside a silent client", t.elapsed());

    let ok = raw(&addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("\r\n\r\n# HELP machnet_info "), "{ok}");
    let head = raw(&addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
    assert!(raw(&addr, b"GET /nothing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    assert!(raw(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(raw(&addr, b"hello\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(10_000));
    assert!(raw(&addr, big.as_bytes()).starts_with("HTTP/1.1 431 "));
    // The silent clients are dropped after the request timeout (5 s).
    let mut buf = [0u8; 16];
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!((&silent).read(&mut buf).expect("closed, not timed out"), 0, "silent client closed");
    drop(half);
    assert!(a.log_text().contains("metrics: serving"));
}
