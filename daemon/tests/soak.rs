//! Soak: 64 applications × 16 flows churning connects, messages and closes over two daemons,
//! re-attaching channels and re-registering now and then. Afterwards nothing has leaked:
//! no flow, channel, application, buffer or file descriptor is left, and the daemon's memory
//! has not grown from the first half to the second. `MACHNET_SOAK_SECS` sets the length
//! (default 20 s; longer on demand).

mod common;

use common::*;
use machnet::client::Machnet;
use machnet::layout::MachnetFlow;
use machnet::testing::process::output_within;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APPS: usize = 64;
const FLOWS: usize = 16;
const PORT: u16 = 888;

fn ctl(sock: &Path) -> Value {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_machnetctl")).arg("--ctrl-sock").arg(sock).args(["--json", "channels"]),
        RUN,
        "machnetctl --json channels",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until the daemon reports no flow, channel or application.
fn wait_empty(sock: &Path) -> Value {
    let t = Instant::now();
    loop {
        let d = ctl(sock);
        let st = &d["status"];
        if st["flows"] == 0 && st["channels"] == 0 && st["apps"] == 0 {
            return d;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon did not drain: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One application: rounds of (connect 16 flows, echo a few messages on each, close them);
/// every 4th round a new channel, every 7th a new registration.
fn app(sock: std::path::PathBuf, i: usize, until: Instant, rounds: Arc<AtomicU64>, msgs: Arc<AtomicU64>) {
    let mut m = Machnet::connect(&sock).expect("register");
    let mut ch = m.attach().expect("attach");
    let mut buf = vec![0u8; 16 << 10];
    let mut round = 0u64;
    while Instant::now() < until {
        let flows: Vec<MachnetFlow> = (0..FLOWS).map(|_| ch.connect(IP_A, IP_B, PORT).expect("connect")).collect();
        for (k, f) in flows.iter().enumerate() {
            let size = 1 + (i * 7919 + k * 104_729 + round as usize * 31) % (16 << 10);
            let mut msg = vec![0u8; size];
            fill(&mut msg, i as u64, round * 100 + k as u64);
            send_retry(&mut ch, *f, &msg);
        }
        for _ in 0..FLOWS {
            let (n, from) = ch.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap().expect("an echo");
            let k = flows.iter().position(|f| *f == reverse(from)).expect("an echo on one of our flows");
            check(&buf[..n], i as u64, round * 100 + k as u64);
            msgs.fetch_add(1, Ordering::Relaxed);
        }
        for f in &flows {
            ch.close(*f).expect("close");
        }
        round += 1;
        rounds.fetch_add(1, Ordering::Relaxed);
        if round % 7 == 0 {
            drop(ch);
            m = Machnet::connect(&sock).expect("register again");
            ch = m.attach().expect("attach");
        } else if round % 4 == 0 {
            ch = m.attach().expect("attach another channel");
        }
    }
}

#[test]
fn sixty_four_apps_churning_sixteen_flows_each_leak_nothing() {
    let secs: u64 = std::env::var("MACHNET_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    // Default channel sizes: B's one echo channel receives from all 1024 flows at once, each
    // with a message of up to 12 packets in flight (a pool smaller than flows × message leaves
    // partial messages holding every buffer; see docs/operations.md, channel.buffers).
    let (a, b) = Daemon::pair("");
    let (pid_a, pid_b) = (a.pid(), b.pid());
    // The echo side: one application on B, echoing everything.
    let server = echo_server_on(&b, PORT, u64::MAX);
    let fd0 = fds(pid_a);
    let rounds = Arc::new(AtomicU64::new(0));
    let msgs = Arc::new(AtomicU64::new(0));
    // The same churn twice; after each, everything drains. Whatever grows once (tables, the
    // allocator's arenas) grows in the first phase; a leak grows in both.
    let phase = |secs: u64| -> (Value, usize, u64, Vec<u64>) {
        let until = Instant::now() + Duration::from_secs(secs);
        let workers: Vec<_> = (0..APPS)
            .map(|i| {
                let (s, r, m) = (a.sock.clone(), rounds.clone(), msgs.clone());
                std::thread::spawn(move || app(s, i, until, r, m))
            })
            .collect();
        let mut samples = Vec::new();
        while Instant::now() < until {
            std::thread::sleep(Duration::from_secs(1));
            samples.push(rss_kib(pid_a));
        }
        for w in workers {
            w.join().expect("an application failed");
        }
        let d = wait_empty(&a.sock);
        // The last channel's descriptors close as its shard lets it go.
        let t = Instant::now();
        while fds(pid_a) > fd0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        (d, fds(pid_a), rss_kib(pid_a), samples)
    };
    let half = (secs / 2).max(5);
    let t = Instant::now();
    let (_, fd1, rss1, s1) = phase(half);
    let (d, fd2, rss2, s2) = phase(half);
    let ep = &d["shards"][0]["endpoint"];
    eprintln!(
        "{} rounds, {} messages echoed in {:.0?}, {} flows opened; daemon A: fds {fd0} -> {fd1} -> {fd2}, RSS after each phase {rss1} -> {rss2} KiB; RSS each second {s1:?} {s2:?}",
        rounds.load(Ordering::Relaxed),
        msgs.load(Ordering::Relaxed),
        t.elapsed(),
        ep["flows_opened"]
    );
    assert!(rounds.load(Ordering::Relaxed) >= 2 * APPS as u64, "every application got through rounds");
    // Nothing leaked: descriptors back where they were, memory flat from one phase to the
    // next, no flows or channels, no protocol trouble.
    assert_eq!((fd1, fd2), (fd0, fd0), "file descriptors of daemon A");
    assert!(rss2 <= rss1 + 8 * 1024, "RSS grew {rss1} -> {rss2} KiB over the second phase");
    let c = &d["shards"][0]["counters"];
    assert_eq!(c["channel_violations"], 0, "{c}");
    assert_eq!(c["tx_refused"], 0, "{c}");
    assert_eq!(ep["flows_failed"], 0, "{ep}");
    assert!(d["channels"].as_array().unwrap().is_empty());
    // B's side of every flow closed too; only its echo application's channel remains.
    let t = Instant::now();
    while ctl(&b.sock)["status"]["flows"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "B kept flows: {}", ctl(&b.sock)["status"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ctl(&b.sock)["status"]["channels"], 1);
    assert!(fds(pid_b) > 0);
    drop(b);
    let _ = server.join();
    drop(a);
}
