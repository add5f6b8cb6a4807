//! The contention harness's traffic (daemon/tests/contention.rs, and the DPDK variants in
//! daemon/tests/dpdk.rs): applications on two daemons exchanging messages of every size class
//! with every byte checked, channels coming and going, and the daemons' responsiveness
//! watched, while CPU hogs ([`super::load::Hogs`]) compete for every CPU.

use super::load::pin_thread;
use super::{pattern, reverse, send_retry, Daemon};
use machnet::client::{Channel, Machnet};
use machnet::ops::EventKind;
use serde_json::Value;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The echo server of the streams.
pub const PORT: u16 = 888;
/// The echo server of the churn.
pub const CHURN_PORT: u16 = 889;
/// Message sizes the streams cycle through (1 B to 1 MiB; 1418 B is one full packet).
pub const SIZES: [usize; 10] = [1, 64, 1000, 1418, 1419, 4096, 65_536, 100_000, 300_000, 1 << 20];
/// Longest an echo may take, even on a machine this busy, before the test calls it lost.
pub const ECHO_LIMIT: Duration = Duration::from_secs(30);

/// The harness's traffic time: `MACHNET_CONTENTION_SECS`, default 10 s.
pub fn secs() -> u64 {
    std::env::var("MACHNET_CONTENTION_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10)
}

/// Byte `j` of message `k` on the flow whose client port is `port`.
pub fn byte(port: u16, k: u64, j: usize) -> u8 {
    pattern(u64::from(port), k, j)
}

pub fn fill_msg(buf: &mut [u8], port: u16, k: u64) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = byte(port, k, j);
    }
}

pub fn check_msg(buf: &[u8], port: u16, k: u64, who: &str) {
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

pub fn size_of(port: u16, k: u64) -> usize {
    SIZES[(pattern(u64::from(port), k, 99) as usize + k as usize) % SIZES.len()]
}

/// The echo server: verifies every message (content, and with `ordered` the order per flow;
/// without it every message is a flow's first, as the churn sends) and sends it back. `echoed`
/// counts messages accepted, before their echo leaves.
pub fn echo_server(
    m: Machnet,
    port: u16,
    ordered: bool,
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    cpu: usize,
) -> JoinHandle<()> {
    let mut ch = m.attach().unwrap();
    ch.listen(Ipv4Addr::UNSPECIFIED, port).unwrap();
    std::thread::spawn(move || {
        pin_thread(cpu);
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

/// One stream's figures.
#[derive(Default, Debug)]
pub struct StreamResult {
    pub msgs: u64,
    pub bytes: u64,
    pub max_rtt: Duration,
}

/// One client flow: `window` messages outstanding, each echo checked, until `stop`.
fn stream(
    m: Machnet,
    ips: (Ipv4Addr, Ipv4Addr),
    window: u64,
    stop: Arc<AtomicBool>,
    cpu: usize,
) -> JoinHandle<StreamResult> {
    std::thread::spawn(move || {
        pin_thread(cpu);
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(ips.0, ips.1, PORT).unwrap();
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
fn churn(
    m: Machnet,
    ips: (Ipv4Addr, Ipv4Addr),
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    cpu: usize,
) -> JoinHandle<Duration> {
    std::thread::spawn(move || {
        pin_thread(cpu);
        let mut worst = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let mut ch = m.attach().unwrap();
            let flow = ch
                .connect(ips.0, ips.1, CHURN_PORT)
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
pub fn join_within<T>(h: JoinHandle<T>, limit: Duration, what: &str) -> T {
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

/// One line per daemon: its first shard's longest loop, stalls, failures and retransmissions.
pub fn shard_summary(d: &Value) -> String {
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

/// What a harness run saw.
pub struct Traffic {
    /// Messages and bytes per stream window.
    pub streams: Vec<(u64, StreamResult)>,
    /// Attach/connect/echo/detach rounds of the churn and its slowest connect.
    pub churn_rounds: u64,
    pub slowest_connect: Duration,
    /// Slowest `machnetctl shards` answer.
    pub slowest_ctl: Duration,
    /// The servers keep running (for a last check) until this is set.
    pub stop_servers: Arc<AtomicBool>,
    pub servers: Vec<JoinHandle<()>>,
}

/// Runs the harness's traffic between A's applications (on `cpus.0`) and B's (on `cpus.1`) for
/// `secs`: four client flows with windows 1, 2, 4 and 8 cycling through [`SIZES`], every echo
/// checked; a churn of channels; `machnetctl shards` on both daemons every half second, each
/// answered within 2 s. Fails on any lost, duplicated, reordered or corrupted message, any
/// failed flow and any late `machnetctl`. The echo servers stay up (see [`Traffic`]).
pub fn run_traffic(a: &Daemon, b: &Daemon, secs: u64, cpus: (usize, usize)) -> Traffic {
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let servers = vec![
        echo_server(b.app(), PORT, true, stop.clone(), echoed.clone(), cpus.1),
        echo_server(b.app(), CHURN_PORT, false, stop.clone(), echoed.clone(), cpus.1),
    ];
    let client_stop = Arc::new(AtomicBool::new(false));
    let windows = [1u64, 2, 4, 8];
    let streams: Vec<_> =
        windows.iter().map(|&w| stream(a.app(), (a.ip, b.ip), w, client_stop.clone(), cpus.0)).collect();
    let rounds = Arc::new(AtomicU64::new(0));
    let churner = churn(a.app(), (a.ip, b.ip), client_stop.clone(), rounds.clone(), cpus.0);
    let start = Instant::now();
    let mut slowest_ctl = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        for d in [a, b] {
            let t = Instant::now();
            d.ctl_within("shards", Duration::from_secs(2));
            slowest_ctl = slowest_ctl.max(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    client_stop.store(true, Ordering::Relaxed);
    let results: Vec<StreamResult> =
        streams.into_iter().map(|h| join_within(h, Duration::from_secs(120), "a client stream")).collect();
    let slowest_connect = join_within(churner, Duration::from_secs(60), "the churn thread");
    let sa = a.ctl_within("shards", Duration::from_secs(5));
    let sb = b.ctl_within("shards", Duration::from_secs(5));
    for (w, r) in windows.iter().zip(&results) {
        eprintln!(
            "window {w}: {} messages, {:.1} MB, slowest echo {:.1} ms",
            r.msgs,
            r.bytes as f64 / 1e6,
            r.max_rtt.as_secs_f64() * 1e3
        );
    }
    let churn_rounds = rounds.load(Ordering::Relaxed);
    eprintln!(
        "churn: {churn_rounds} attach/connect/echo/detach rounds, slowest connect {:.1} ms; slowest machnetctl {:.1} ms",
        slowest_connect.as_secs_f64() * 1e3,
        slowest_ctl.as_secs_f64() * 1e3
    );
    eprintln!("A: {}\nB: {}", shard_summary(&sa), shard_summary(&sb));
    let total: u64 = results.iter().map(|r| r.msgs).sum::<u64>() + churn_rounds;
    assert_eq!(echoed.load(Ordering::Relaxed), total, "the servers echoed exactly what the clients received");
    assert!(results.iter().all(|r| r.msgs > 0), "every stream made progress: {results:?}");
    for (d, s) in [(a, &sa), (b, &sb)] {
        for sh in s["shards"].as_array().unwrap() {
            assert_eq!(sh["endpoint"]["flows_failed"], 0, "{}: no flow failed", d.ip);
        }
    }
    Traffic {
        streams: windows.into_iter().zip(results).collect(),
        churn_rounds,
        slowest_connect,
        slowest_ctl,
        stop_servers: stop,
        servers,
    }
}
