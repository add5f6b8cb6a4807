//! The contention harness: two daemons and their applications, each pair pinned to one CPU,
//! with CPU-burning processes at the same priority on every CPU (a shared VM, a CI runner).
//! A slow machine may make the stack slow, never wrong:
//!
//! * no flow fails, and every message arrives once, in order, with its content intact
//!   (mixed sizes from 1 B to 1 MiB, windows 1 to 8, both directions);
//! * channels keep being attached, connected, used and detached meanwhile;
//! * the daemons stay responsive: `machnetctl` answers, and SIGTERM stops them within 1 s.
//!
//! `MACHNET_CONTENTION_SECS` sets the traffic time (default 10 s); the figures are printed.

mod common;

use common::load::{pin_thread, Hogs};
use common::*;
use machnet::client::{Channel, Machnet};
use machnet::layout::MachnetFlow;
use machnet::ops::EventKind;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PORT: u16 = 888;
const CHURN_PORT: u16 = 889;
/// Message sizes the streams cycle through (1 B to 1 MiB; 1418 B is one full packet).
const SIZES: [usize; 10] = [1, 64, 1000, 1418, 1419, 4096, 65_536, 100_000, 300_000, 1 << 20];
/// Longest an echo may take, even on a machine this busy, before the test calls it lost.
const ECHO_LIMIT: Duration = Duration::from_secs(30);

fn secs() -> u64 {
    std::env::var("MACHNET_CONTENTION_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10)
}

/// Byte `j` of message `k` on the flow whose client port is `port`.
fn byte(port: u16, k: u64, j: usize) -> u8 {
    pattern(u64::from(port), k, j)
}

fn fill_msg(buf: &mut [u8], port: u16, k: u64) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = byte(port, k, j);
    }
}

fn check_msg(buf: &[u8], port: u16, k: u64, who: &str) {
    if let Some(j) = (0..buf.len()).find(|&j| buf[j] != byte(port, k, j)) {
        panic!("{who}: message {k} of flow from port {port}: byte {j} of {} is wrong", buf.len());
    }
}

/// Fails on any event that means a flow died.
fn check_events(ch: &mut Channel, who: &str) {
    while let Some(ev) = ch.poll_event() {
        if matches!(ev.kind, EventKind::FlowFailed | EventKind::FlowClosed | EventKind::TxRefused) {
            panic!("{who}: unexpected event {ev:?}");
        }
    }
}

fn size_of(port: u16, k: u64) -> usize {
    SIZES[(pattern(u64::from(port), k, 99) as usize + k as usize) % SIZES.len()]
}

/// The echo server: verifies every message (content, and with `ordered` the order per flow;
/// without it every message is a flow's first, as the churn sends) and sends it back. `echoed`
/// counts messages accepted, before their echo leaves.
fn echo_server(m: Machnet, port: u16, ordered: bool, stop: Arc<AtomicBool>, echoed: Arc<AtomicU64>) -> JoinHandle<()> {
    let mut ch = m.attach().unwrap();
    ch.listen(IP_B, port).unwrap();
    std::thread::spawn(move || {
        pin_thread(1);
        let _m = m;
        let mut next: HashMap<u16, u64> = HashMap::new();
        let mut buf = vec![0u8; 2 << 20];
        loop {
            check_events_server(&mut ch);
            match ch.recv_blocking(&mut buf, Some(Duration::from_millis(200))) {
                Ok(Some((len, from))) => {
                    let k = if ordered { next.entry(from.src_port).or_insert(0) } else { &mut 0 };
                    assert_eq!(
                        len,
                        size_of(from.src_port, *k),
                        "server: size of message {k} from port {}",
                        from.src_port
                    );
                    check_msg(&buf[..len], from.src_port, *k, "server");
                    *k += 1;
                    echoed.fetch_add(1, Ordering::Relaxed);
                    send_retry(&mut ch, reverse(from), &buf[..len]);
                }
                Ok(None) if stop.load(Ordering::Relaxed) => return,
                Ok(None) => {}
                // Its daemon was stopped at the end of the test.
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(e) => panic!("server on port {port}: receive failed: {e}"),
            }
        }
    })
}

/// Servers see clients come and go (the churn detaches its channels): closed flows are
/// expected, failed ones are not.
fn check_events_server(ch: &mut Channel) {
    while let Some(ev) = ch.poll_event() {
        assert!(ev.kind != EventKind::FlowFailed, "server: a flow failed: {ev:?}");
    }
}

#[derive(Default, Debug)]
struct StreamResult {
    msgs: u64,
    bytes: u64,
    max_rtt: Duration,
}

/// One client flow: `window` messages outstanding, each echo checked, until `stop`.
fn stream(m: Machnet, window: u64, stop: Arc<AtomicBool>, cpu: usize) -> JoinHandle<StreamResult> {
    std::thread::spawn(move || {
        pin_thread(cpu);
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
        let port = flow.src_port;
        let mut out = vec![0u8; 1 << 20];
        let mut inb = vec![0u8; (1 << 20) + 1];
        let mut sent_at = std::collections::VecDeque::new();
        let (mut sent, mut got) = (0u64, 0u64);
        let mut r = StreamResult::default();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            while !stopping && sent - got < window {
                let len = size_of(port, sent);
                fill_msg(&mut out[..len], port, sent);
                send_retry(&mut ch, flow, &out[..len]);
                sent_at.push_back(Instant::now());
                sent += 1;
            }
            if got == sent {
                break;
            }
            check_events(&mut ch, "client");
            match ch.recv_blocking(&mut inb, Some(ECHO_LIMIT)) {
                Ok(Some((len, from))) => {
                    assert_eq!(reverse(from), flow, "the echo arrives on its own flow");
                    assert_eq!(len, size_of(port, got), "client: size of echo {got}");
                    check_msg(&inb[..len], port, got, "client");
                    r.max_rtt = r.max_rtt.max(sent_at.pop_front().unwrap().elapsed());
                    r.msgs += 1;
                    r.bytes += len as u64;
                    got += 1;
                }
                Ok(None) => panic!("client port {port}: no echo of message {got} within {ECHO_LIMIT:?}"),
                Err(e) => panic!("client port {port}: receive failed: {e}"),
            }
        }
        check_events(&mut ch, "client");
        ch.close(flow).unwrap();
        r
    })
}

/// Attaches a channel, connects, exchanges one message and detaches, over and over: the
/// longest connect (attach included) is returned.
fn churn(m: Machnet, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>, cpu: usize) -> JoinHandle<Duration> {
    std::thread::spawn(move || {
        pin_thread(cpu);
        let mut worst = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let mut ch = m.attach().unwrap();
            let flow = ch
                .connect(IP_A, IP_B, CHURN_PORT)
                .unwrap_or_else(|e| panic!("churn: connect failed after {:?}: {e}", t.elapsed()));
            worst = worst.max(t.elapsed());
            let k = rounds.load(Ordering::Relaxed);
            let len = size_of(flow.src_port, 0);
            let mut msg = vec![0u8; len];
            fill_msg(&mut msg, flow.src_port, 0);
            send_retry(&mut ch, flow, &msg);
            let got = ch.recv_blocking(&mut vec![0u8; len + 1], Some(ECHO_LIMIT)).unwrap();
            assert!(got.is_some(), "churn round {k}: no echo within {ECHO_LIMIT:?}");
            ch.detach().unwrap();
            rounds.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        }
        worst
    })
}

/// Joins `h`, failing if it does not finish within `limit`.
fn join_within<T>(h: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let t = Instant::now();
    while !h.is_finished() {
        assert!(t.elapsed() < limit, "{what} did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

fn shard_summary(d: &Value) -> String {
    let s = &d["shards"][0];
    let e = &s["endpoint"];
    format!(
        "max loop {:.0} us, stalls {}, flows failed {}, rto {} (spurious {}), retransmitted {} (of which {} probes) of {} data",
        s["max_loop_us"].as_f64().unwrap_or(0.0),
        s["stalls"],
        e["flows_failed"],
        e["rto_fired"],
        e["spurious_rto"],
        e["tx_retransmits"],
        e["tail_probes"],
        e["tx_data"],
    )
}

#[test]
fn udp_pair_under_cpu_hogs_loses_nothing_and_stays_responsive() {
    let (mut a, mut b) = Daemon::pair_pinned("");
    let hogs = Hogs::start(2);
    eprintln!("{} CPU hogs on {} CPUs; traffic for {} s", hogs.count(), common::load::cpus(), secs());
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let servers = [
        echo_server(b.app(), PORT, true, stop.clone(), echoed.clone()),
        echo_server(b.app(), CHURN_PORT, false, stop.clone(), echoed.clone()),
    ];
    let client_stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = [1u64, 2, 4, 8].iter().map(|&w| stream(a.app(), w, client_stop.clone(), 0)).collect();
    let rounds = Arc::new(AtomicU64::new(0));
    let churner = churn(a.app(), client_stop.clone(), rounds.clone(), 0);

    // Meanwhile the daemons answer machnetctl promptly.
    let start = Instant::now();
    let mut slowest_ctl = Duration::ZERO;
    let worst_loop = Mutex::new((0.0f64, String::new()));
    while start.elapsed() < Duration::from_secs(secs()) {
        for d in [&a, &b] {
            let t = Instant::now();
            let s = d.ctl_within("shards", Duration::from_secs(2));
            slowest_ctl = slowest_ctl.max(t.elapsed());
            let l = s["shards"][0]["max_loop_us"].as_f64().unwrap_or(0.0);
            let mut w = worst_loop.lock().unwrap();
            if l > w.0 {
                *w = (l, format!("{}: {s}", d.ip));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    client_stop.store(true, Ordering::Relaxed);
    let results: Vec<StreamResult> =
        streams.into_iter().map(|h| join_within(h, Duration::from_secs(120), "a client stream")).collect();
    let worst_connect = join_within(churner, Duration::from_secs(60), "the churn thread");
    let sa = a.ctl_within("shards", Duration::from_secs(5));
    let sb = b.ctl_within("shards", Duration::from_secs(5));

    for (w, r) in [1, 2, 4, 8].iter().zip(&results) {
        eprintln!(
            "window {w}: {} messages, {:.1} MB, slowest echo {:.1} ms",
            r.msgs,
            r.bytes as f64 / 1e6,
            r.max_rtt.as_secs_f64() * 1e3
        );
    }
    eprintln!(
        "churn: {} attach/connect/echo/detach rounds, slowest connect {:.1} ms; slowest machnetctl {:.1} ms",
        rounds.load(Ordering::Relaxed),
        worst_connect.as_secs_f64() * 1e3,
        slowest_ctl.as_secs_f64() * 1e3
    );
    eprintln!("A: {}\nB: {}", shard_summary(&sa), shard_summary(&sb));
    let total: u64 = results.iter().map(|r| r.msgs).sum::<u64>() + rounds.load(Ordering::Relaxed);
    assert_eq!(echoed.load(Ordering::Relaxed), total, "the servers echoed exactly what the clients received");
    assert!(results.iter().all(|r| r.msgs > 0), "every stream made progress: {results:?}");
    for (d, s) in [(&a, &sa), (&b, &sb)] {
        assert_eq!(s["shards"][0]["endpoint"]["flows_failed"], 0, "{}: no flow failed", d.ip);
    }

    // Asked to stop under load, with flows open, each daemon exits within a second.
    let streams_open: Vec<_> = (0..2).map(|_| a.app()).collect();
    let mut chans: Vec<(Machnet, Channel, MachnetFlow)> = streams_open
        .into_iter()
        .map(|m| {
            let mut ch = m.attach().unwrap();
            let f = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("connect before shutdown: {e}"));
            (m, ch, f)
        })
        .collect();
    for (_, ch, f) in &mut chans {
        let len = size_of(f.src_port, 0);
        let mut msg = vec![0u8; len];
        fill_msg(&mut msg, f.src_port, 0);
        send_retry(ch, *f, &msg);
    }
    stop.store(true, Ordering::Relaxed);
    let took_b = b.stop_within(Duration::from_secs(1));
    let took_a = a.stop_within(Duration::from_secs(1));
    eprintln!("SIGTERM to exit under load: A {took_a:?}, B {took_b:?}");
    for h in servers {
        join_within(h, Duration::from_secs(10), "an echo server");
    }
    drop(hogs);
}

/// Closing a channel must not stop its shard: unmapping a used channel's tens of megabytes takes
/// 10-20 ms, which the controller does, not the shard. Judged by the shard thread's CPU time in
/// each channel adoption and removal, so that a loaded machine's preemptions do not count.
#[test]
fn closing_used_channels_does_not_stall_the_shard() {
    const PORT_ECHO: u16 = 890;
    let (a, b) = Daemon::pair("");
    let server = echo_server_on(&b, PORT_ECHO, u64::MAX);
    let m = a.app();
    for round in 0..10 {
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(IP_A, IP_B, PORT_ECHO).unwrap();
        // Touch a few thousand pages of the channel: 64 messages of 64 KiB out, and back.
        ping_pong(&mut ch, flow, round, 65_536, 64, 8);
        ch.detach().unwrap();
    }
    drop(m);
    for d in [&a, &b] {
        let s = d.ctl_within("shards", Duration::from_secs(5));
        let sh = &s["shards"][0];
        let op = sh["counters"]["max_channel_op_cpu_us"].as_f64().unwrap();
        eprintln!("{}: the longest channel adoption or removal took {op:.0} us of the shard's CPU", d.ip);
        assert!(op < 1000.0, "{}: a channel operation held the shard for {op:.0} us", d.ip);
    }
    drop(server);
}

/// A daemon serving many used channels stops within a second of SIGTERM (it resets the flows,
/// tells the applications and exits; unmapping every channel one by one would take seconds).
#[test]
fn sigterm_with_many_used_channels_stops_within_a_second() {
    const PORT_ECHO: u16 = 891;
    let (mut a, b) = Daemon::pair("");
    let server = echo_server_on(&b, PORT_ECHO, u64::MAX);
    let m = a.app();
    let mut chans = Vec::new();
    for round in 0..48 {
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(IP_A, IP_B, PORT_ECHO).unwrap();
        ping_pong(&mut ch, flow, round, 65_536, 32, 8);
        chans.push(ch);
    }
    let took = a.stop_within(Duration::from_secs(1));
    eprintln!("48 used channels: stopped {took:?} after SIGTERM");
    drop((chans, m, server));
}
