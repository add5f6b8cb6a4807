//! Many shards, end to end: two `machnetd` on the multi-queue udp backend, A with 2 shards and
//! B with 3, each told the other's queues and RSS key (B's is a key of its own), so every frame
//! reaches the queue an RSS NIC would give it.
//!
//! * 64 client flows from applications on every shard of one daemon to two listeners (on two
//!   shards) of the other, both ways round: every message arrives once and in order; the
//!   client flows' source ports steer their replies to their own shard (checked against the
//!   Toeplitz hash of each flow's tuple under the client daemon's key), which hands nothing
//!   over; the server flows hash to every shard of their daemon and are handed to the
//!   listener's shard; per-flow and per-shard counters add up; closing every flow leaves no
//!   flow behind.
//! * An application with flows on every shard is killed: its daemon resets them and the peer's
//!   application is told of each. A daemon with client and server flows on every shard shuts
//!   down: the peer's applications are told of each flow, its own see their channels close.
//!
//! * With the `dpdk` feature, the flow tests again over DPDK memif with sender-side steering
//!   (`dpdk.memif_steering`): one queue pair per (shard, peer shard), the sender choosing the
//!   one that meets the receiver's RSS queue.
//!
//! Every wait is bounded; the daemons and the child application are killed by their guards.

mod common;

use common::*;
use machnet::client::{Channel, Error as ClientError, Machnet};
use machnet::layout::MachnetFlow;
use machnet::ops::EventKind;
use machnet::testing::process::{ChildGuard, Lines};
use machnet_net::rss::{ipv4_tuple_input, toeplitz, MICROSOFT_KEY};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SHARDS_A: u32 = 2;
const SHARDS_B: u32 = 3;
/// The listeners of the flow tests (the first on the server daemon's shard 0, the second on
/// its shard 1).
const PORTS: [u16; 2] = [888, 889];
/// Client flows per test.
const FLOWS: usize = 64;
/// Messages each way on every flow.
const MSGS: u64 = 12;
/// Sizes the messages cycle through (one byte to 22 packets).
const SIZES: [usize; 6] = [1, 200, 1418, 1419, 5000, 30_000];
/// Longest wait for anything the daemons do (an echo, a close, a reset), even on a busy host.
const LIMIT: Duration = Duration::from_secs(20);
/// Entries of the tunnel's redirection table (round-robin over the queues).
const RETA: u32 = 128;

fn key_a() -> Vec<u8> {
    MICROSOFT_KEY.to_vec()
}

fn key_b() -> Vec<u8> {
    (0..40u32).map(|i| (i * 73 + 11) as u8).collect()
}

fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn pair() -> (Daemon, Daemon) {
    Daemon::pair_shards(SHARDS_A, SHARDS_B, (&hex(&key_a()), &hex(&key_b())), "")
}

/// The queue an RSS NIC with `key` and a round-robin table over `shards` queues gives a packet
/// from `src` to `dst`.
fn queue(key: &[u8], shards: u32, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> u64 {
    let h = toeplitz(key, &ipv4_tuple_input(src.0, dst.0, src.1, dst.1));
    u64::from((h % RETA) % shards)
}

fn addr(v: &Value) -> (Ipv4Addr, u16) {
    let s = v.as_str().unwrap();
    let (ip, port) = s.split_once(':').unwrap();
    (ip.parse().unwrap(), port.parse().unwrap())
}

fn size_of(k: u64) -> usize {
    SIZES[k as usize % SIZES.len()]
}

/// Messages a listener's application received per flow (remote IP and port): the flows still
/// open, and those closed (a closed flow's port may come back on a new flow).
#[derive(Default)]
struct Seen {
    open: HashMap<(u32, u16), u64>,
    closed: Vec<u64>,
}

/// A listener's echo application: checks every message (size, content, order per flow) and
/// sends it back; counts flows the peer closed. Runs until `stop` (or its daemon goes).
struct Echo {
    seen: Arc<Mutex<Seen>>,
    /// Flow-closed events.
    closed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(d: &Daemon, port: u16) -> Echo {
        let m = d.app();
        let mut ch = m.attach().unwrap();
        ch.listen(d.ip, port).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let closed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (seen.clone(), closed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _m = m;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                while let Some(ev) = ch.poll_event() {
                    match ev.kind {
                        EventKind::FlowClosed => {
                            // The event names the flow as we send on it.
                            let mut seen = s.lock().unwrap();
                            let n = seen.open.remove(&(ev.flow.dst_ip, ev.flow.dst_port)).unwrap_or(0);
                            seen.closed.push(n);
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        EventKind::FlowFailed => panic!("echo on {port}: a flow failed: {ev:?}"),
                        _ => {}
                    }
                }
                match ch.recv_blocking(&mut buf, Some(Duration::from_millis(100))) {
                    Ok(Some((len, from))) => {
                        let k = {
                            let mut seen = s.lock().unwrap();
                            let k = seen.open.entry((from.src_ip, from.src_port)).or_insert(0);
                            *k += 1;
                            *k - 1
                        };
                        assert_eq!(len, size_of(k), "echo on {port}: size of message {k} from port {}", from.src_port);
                        check(&buf[..len], u64::from(from.src_port), k);
                        send_retry(&mut ch, reverse(from), &buf[..len]);
                    }
                    Ok(None) if st.load(Ordering::Relaxed) => return,
                    Ok(None) => {}
                    // Its daemon shut down (the shutdown test).
                    Err(ClientError::Closed | ClientError::DaemonGone) => return,
                    Err(e) => panic!("echo on {port}: receive failed: {e}"),
                }
            }
        });
        Echo { seen, closed, stop, thread: Some(thread) }
    }

    fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    /// Stops it; returns how many messages each flow brought, open flows first.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the echo application failed");
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        seen.open.into_values().chain(seen.closed).collect()
    }
}

/// One client application: a channel (on whichever shard the daemon gives it) with `flows`
/// flows to `remote`'s listeners, `MSGS` messages on each (one outstanding per flow, all flows
/// at once), every echo checked. Returns the application, its channel and its flows.
fn client(
    d: &Daemon,
    remote: Ipv4Addr,
    flows: usize,
    first: usize,
) -> JoinHandle<(Machnet, Channel, Vec<MachnetFlow>)> {
    let m = d.app();
    let mut ch = m.attach().unwrap();
    let local = d.ip;
    std::thread::spawn(move || {
        let flows: Vec<MachnetFlow> =
            (0..flows).map(|i| ch.connect(local, remote, PORTS[(first + i) % PORTS.len()]).unwrap()).collect();
        let index: HashMap<u16, usize> = flows.iter().enumerate().map(|(i, f)| (f.src_port, i)).collect();
        let mut out = vec![0u8; SIZES[SIZES.len() - 1]];
        let mut inb = vec![0u8; out.len() + 1];
        for k in 0..MSGS {
            for f in &flows {
                fill(&mut out[..size_of(k)], u64::from(f.src_port), k);
                send_retry(&mut ch, *f, &out[..size_of(k)]);
            }
            let mut got = vec![false; flows.len()];
            for _ in 0..flows.len() {
                let (len, from) = ch
                    .recv_blocking(&mut inb, Some(LIMIT))
                    .unwrap()
                    .unwrap_or_else(|| panic!("no echo of message {k} within {LIMIT:?}"));
                let i = *index.get(&from.dst_port).unwrap_or_else(|| panic!("an echo on a flow not ours: {from:?}"));
                assert_eq!(reverse(from), flows[i], "the echo comes back on its flow");
                assert!(!got[i], "two echoes of message {k} on flow {:?}", flows[i]);
                got[i] = true;
                assert_eq!(len, size_of(k), "echo of message {k}");
                check(&inb[..len], u64::from(flows[i].src_port), k);
            }
        }
        (m, ch, flows)
    })
}

/// Sum of `field` of `section` ("endpoint" or "counters") over a daemon's shards.
fn total(shards: &[Value], section: &str, field: &str) -> u64 {
    shards.iter().map(|s| s[section][field].as_u64().unwrap_or_else(|| panic!("{section}.{field}"))).sum()
}

/// Waits until `cond` holds (checked every 20 ms), at most [`LIMIT`]; fails naming `what`.
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < LIMIT, "waited {LIMIT:?} in vain for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn flows_of(d: &Daemon) -> Vec<Value> {
    ctl_json(&d.sock, "flows")["flows"].as_array().unwrap().clone()
}

fn shards_of(d: &Daemon) -> Vec<Value> {
    ctl_json(&d.sock, "shards")["shards"].as_array().unwrap().clone()
}

/// 64 client flows from channels on every shard of `c` to the two listeners of `s`; see the
/// module comment for what is checked.
fn flows_on_every_shard(c: &Daemon, (c_shards, c_key): (u32, &[u8]), s: &Daemon, (s_shards, s_key): (u32, &[u8])) {
    let echoes: Vec<Echo> = PORTS.iter().map(|&p| Echo::start(s, p)).collect();
    // Two applications per shard (the daemon puts each channel on its least loaded shard).
    let apps = 2 * c_shards as usize;
    let workers: Vec<_> = (0..apps).map(|i| client(c, s.ip, FLOWS / apps + usize::from(i < FLOWS % apps), i)).collect();
    let clients: Vec<_> = workers.into_iter().map(|w| w.join().expect("a client application failed")).collect();

    // Client side: every flow lives on its channel's shard, every shard has flows, and each
    // flow's source port makes the server's replies hash (under the client daemon's key) to
    // that shard. Its shards hand no frame over: every reply arrived on its flow's own queue.
    let cflows = flows_of(c);
    assert_eq!(cflows.len(), FLOWS, "client flows: {cflows:#?}");
    let channels = ctl_json(&c.sock, "channels")["channels"].as_array().unwrap().clone();
    let shard_of_channel: HashMap<u64, u64> =
        channels.iter().map(|x| (x["id"].as_u64().unwrap(), x["shard"].as_u64().unwrap())).collect();
    let mut used = HashSet::new();
    for f in &cflows {
        let (shard, local, remote) = (f["shard"].as_u64().unwrap(), addr(&f["local"]), addr(&f["remote"]));
        assert_eq!(Some(&shard), shard_of_channel.get(&f["channel"].as_u64().unwrap()), "{f}");
        assert_eq!(queue(c_key, c_shards, remote, local), shard, "replies of client flow {f} steer to its shard");
        assert_eq!((f["tx_msgs"].as_u64(), f["rx_msgs"].as_u64()), (Some(MSGS), Some(MSGS)), "{f}");
        used.insert(shard);
    }
    assert_eq!(used.len(), c_shards as usize, "client flows on every shard");
    let cs = shards_of(c);
    for (i, sh) in cs.iter().enumerate() {
        let n = &sh["counters"];
        assert_eq!(n["handoff_frames_sent"], 0, "client shard {i} handed frames over: {n}");
        assert_eq!(n["handoff_frames_received"], 0, "client shard {i} was handed frames: {n}");
        assert!(n["port_rx_frames"].as_u64().unwrap() > 0, "client shard {i}'s queue received nothing: {n}");
        assert_eq!(n["port_rx_dropped"], 0, "client shard {i} dropped frames (from a queue it did not know?): {n}");
    }

    // Server side: the flows live on the listeners' shards; their frames hash to every shard
    // (for each listener alone too), and what arrived elsewhere was handed to the listener's
    // shard, none dropped.
    let sflows = flows_of(s);
    assert_eq!(sflows.len(), FLOWS, "server flows: {sflows:#?}");
    let listener_shard: HashMap<u16, u64> = PORTS.iter().zip(0..).map(|(&p, i)| (p, i)).collect();
    let mut hashed: HashMap<u16, HashSet<u64>> = HashMap::new();
    let mut foreign = vec![false; s_shards as usize];
    for f in &sflows {
        let (shard, local, remote) = (f["shard"].as_u64().unwrap(), addr(&f["local"]), addr(&f["remote"]));
        assert_eq!(Some(&shard), listener_shard.get(&local.1), "server flow {f} lives with its listener");
        assert_eq!((f["tx_msgs"].as_u64(), f["rx_msgs"].as_u64()), (Some(MSGS), Some(MSGS)), "{f}");
        let q = queue(s_key, s_shards, remote, local);
        hashed.entry(local.1).or_default().insert(q);
        if q != shard {
            foreign[q as usize] = true;
        }
    }
    for (port, qs) in &hashed {
        assert_eq!(qs.len(), s_shards as usize, "the listener on {port} accepted flows hashing to every shard");
    }
    let ss = shards_of(s);
    for (i, sh) in ss.iter().enumerate() {
        let n = &sh["counters"];
        assert_eq!(n["handoff_frames_sent"].as_u64().unwrap() > 0, foreign[i], "server shard {i}: {n}");
        assert!(n["port_rx_frames"].as_u64().unwrap() > 0, "server shard {i}'s queue received nothing: {n}");
        assert_eq!(n["port_rx_dropped"], 0, "server shard {i} dropped frames: {n}");
    }
    assert_eq!(total(&ss, "counters", "handoff_dropped"), 0);
    assert_eq!(total(&ss, "counters", "handoff_frames_sent"), total(&ss, "counters", "handoff_frames_received"));

    // Counters add up: every message once each way.
    let all = FLOWS as u64 * MSGS;
    for (who, shards) in [("client", &cs), ("server", &ss)] {
        for field in ["tx_messages", "rx_messages"] {
            assert_eq!(total(shards, "endpoint", field), all, "{who} {field}");
        }
    }
    assert_eq!(total(&cs, "endpoint", "flows_opened"), FLOWS as u64);
    assert_eq!(total(&ss, "endpoint", "flows_opened"), FLOWS as u64);

    // Closing: every flow, from its own channel; the server's applications are told of each,
    // and no flow is left on either side.
    let mut clients = clients;
    for (_, ch, flows) in &mut clients {
        for f in flows.iter() {
            ch.close(*f).unwrap();
        }
    }
    wait_for("the listeners' applications told of every closed flow", || {
        echoes.iter().map(|e| e.closed()).sum::<u64>() == FLOWS as u64
    });
    for d in [c, s] {
        wait_for("no flow left", || ctl_json(&d.sock, "status")["status"]["flows"] == 0);
    }
    let seen: Vec<u64> = echoes.into_iter().flat_map(Echo::finish).collect();
    assert_eq!(seen, vec![MSGS; FLOWS], "each flow's messages, each once");
    // Nothing more arrives at the clients.
    let mut buf = [0u8; 64];
    for (_, ch, _) in &mut clients {
        assert!(ch.recv_blocking(&mut buf, Some(Duration::from_millis(50))).unwrap().is_none(), "a duplicate");
    }
}

#[test]
fn flows_from_every_shard_of_a_to_b_steer_home_and_are_handed_to_the_listener() {
    let (a, b) = pair();
    flows_on_every_shard(&a, (SHARDS_A, &key_a()), &b, (SHARDS_B, &key_b()));
    let (la, lb) = (a.stop_log(), b.stop_log());
    assert!(la.contains("2 shard(s)") && lb.contains("3 shard(s)"), "{la}\n{lb}");
}

#[test]
fn flows_from_every_shard_of_b_to_a_steer_home_and_are_handed_to_the_listener() {
    let (a, b) = pair();
    flows_on_every_shard(&b, (SHARDS_B, &key_b()), &a, (SHARDS_A, &key_a()));
    a.stop_log();
    b.stop_log();
}

/// Two daemons joined by DPDK memif (A the memif server with 2 shards, B the client with 3),
/// each told the other's shards and key (`dpdk.memif_steering`): the sender puts each frame on
/// the queue pair that meets the receiver's queue its RSS would pick.
#[cfg(feature = "dpdk")]
fn memif_pair(dir: &TempDir) -> (Daemon, Daemon) {
    let sock = dir.0.join("memif.sock");
    let ext = |role: &str, key: &[u8], peer_queues: u32, peer_key: &[u8]| {
        format!(
            r#""backend": "dpdk", "idle": "adaptive",
               "dpdk": {{"device": "net_memif0,role={role},id=0,socket={},socket-abstract=no",
                        "memif_steering": {{"peer_queues": {peer_queues}, "rss_key": "{}", "peer_rss_key": "{}"}}}}"#,
            sock.display(),
            hex(key),
            hex(peer_key)
        )
    };
    let mut a = Daemon::spawn("memif-a", IP_A, MAC_A, SHARDS_A, &ext("server", &key_a(), SHARDS_B, &key_b()), None);
    // The server creates the socket; the client needs it.
    a.wait_until("its memif socket", |_| sock.exists());
    let mut b = Daemon::spawn("memif-b", IP_B, MAC_B, SHARDS_B, &ext("client", &key_b(), SHARDS_A, &key_a()), None);
    a.wait_ready();
    b.wait_ready();
    (a, b)
}

/// Stops a memif pair together (a memif peer must not poll while the other unmaps its rings);
/// returns their logs.
#[cfg(feature = "dpdk")]
fn stop_memif_pair(mut a: Daemon, mut b: Daemon) -> (String, String) {
    a.terminate();
    b.terminate();
    for d in [&mut a, &mut b] {
        let st = d.wait_exit(LIMIT);
        assert!(st.success(), "machnetd {} exited with {st}: {}", d.ip, d.log_text());
    }
    (a.log_text(), b.log_text())
}

#[cfg(feature = "dpdk")]
#[test]
fn memif_flows_from_every_shard_of_a_to_b_steer_home_and_are_handed_to_the_listener() {
    let dir = TempDir::new("memif-shards-ab");
    let (a, b) = memif_pair(&dir);
    flows_on_every_shard(&a, (SHARDS_A, &key_a()), &b, (SHARDS_B, &key_b()));
    let (la, lb) = stop_memif_pair(a, b);
    for (log, pairs) in [(&la, SHARDS_A * SHARDS_B), (&lb, SHARDS_A * SHARDS_B)] {
        assert!(log.contains(&format!("memif steering: {pairs} queue pair(s)")), "{log}");
    }
}

#[cfg(feature = "dpdk")]
#[test]
fn memif_flows_from_every_shard_of_b_to_a_steer_home_and_are_handed_to_the_listener() {
    let dir = TempDir::new("memif-shards-ba");
    let (a, b) = memif_pair(&dir);
    flows_on_every_shard(&b, (SHARDS_B, &key_b()), &a, (SHARDS_A, &key_a()));
    stop_memif_pair(a, b);
}

/// The child application of the death test (this binary run again): `MACHNET_TEST_CHANNELS`
/// channels with `MACHNET_TEST_FLOWS` flows each to `MACHNET_TEST_REMOTE`:888, one message
/// echoed on each, then `ready`, then idle until killed.
#[test]
#[ignore = "entry point of the child application spawned by the death test"]
fn child_app() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let var = |k: &str| std::env::var(k).unwrap();
    let (local, remote): (Ipv4Addr, Ipv4Addr) =
        (var("MACHNET_TEST_LOCAL").parse().unwrap(), var("MACHNET_TEST_REMOTE").parse().unwrap());
    let (channels, flows): (usize, usize) =
        (var("MACHNET_TEST_CHANNELS").parse().unwrap(), var("MACHNET_TEST_FLOWS").parse().unwrap());
    let m = Machnet::connect(Path::new(&sock)).unwrap();
    let mut chans: Vec<Channel> = (0..channels).map(|_| m.attach().unwrap()).collect();
    for ch in &mut chans {
        for _ in 0..flows {
            let f = ch.connect(local, remote, PORTS[0]).unwrap();
            first_message(ch, f);
        }
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Message 0 of flow `f` (as [`Echo`] checks it), and its echo.
fn first_message(ch: &mut Channel, f: MachnetFlow) {
    let mut msg = vec![0u8; size_of(0)];
    fill(&mut msg, u64::from(f.src_port), 0);
    send_retry(ch, f, &msg);
    let mut buf = [0u8; 64];
    let got = ch.recv_blocking(&mut buf, Some(LIMIT)).unwrap();
    assert!(got.is_some_and(|(len, from)| len == msg.len() && reverse(from) == f), "echo on {f:?}: {got:?}");
}

/// `n` channels of one application on `d`, `flows` flows each to `remote`:`port`, one message
/// echoed on each.
fn connect_all(
    d: &Daemon,
    remote: Ipv4Addr,
    port: u16,
    n: usize,
    flows: usize,
) -> (Machnet, Vec<(Channel, Vec<MachnetFlow>)>) {
    let m = d.app();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut ch = m.attach().unwrap();
        let fs: Vec<MachnetFlow> = (0..flows).map(|_| ch.connect(d.ip, remote, port).unwrap()).collect();
        for f in &fs {
            first_message(&mut ch, *f);
        }
        out.push((ch, fs));
    }
    (m, out)
}

/// The shards of `d` holding flows.
fn shards_with_flows(d: &Daemon) -> HashSet<u64> {
    flows_of(d).iter().map(|f| f["shard"].as_u64().unwrap()).collect()
}

/// Reads `ch` (messages and events) until it has seen `n` flow-closed or flow-failed events or
/// the channel closed; returns how many flow events it saw.
fn flow_endings(ch: &mut Channel, n: usize) -> usize {
    let t = Instant::now();
    let mut seen = 0;
    let mut buf = vec![0u8; 1 << 16];
    while seen < n {
        match ch.recv(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => break,
        }
        while let Some(ev) = ch.poll_event() {
            if matches!(ev.kind, EventKind::FlowClosed | EventKind::FlowFailed) {
                seen += 1;
            }
        }
        assert!(t.elapsed() < LIMIT, "{seen} of {n} flows ended within {LIMIT:?}");
        let _ = ch.wait_rx(Some(Duration::from_millis(10)));
    }
    seen
}

#[test]
fn application_death_and_daemon_shutdown_with_flows_on_every_shard() {
    let (a, mut b) = pair();
    let echo_b = Echo::start(&b, PORTS[0]);

    // An application on A with a channel on each of A's shards and 8 flows on each to B's
    // listener (B's shard 0), killed.
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_app", "--ignored", "--nocapture"])
        .env("MACHNET_TEST_SOCK", &a.sock)
        .env("MACHNET_TEST_LOCAL", IP_A.to_string())
        .env("MACHNET_TEST_REMOTE", IP_B.to_string())
        .env("MACHNET_TEST_CHANNELS", SHARDS_A.to_string())
        .env("MACHNET_TEST_FLOWS", "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = ChildGuard::spawn(&mut c, "child application");
    let mut out = Lines::new(child.child().stdout.take().unwrap());
    assert!(out.wait_for(LIMIT, |l| l == "ready").is_some(), "the child application did not get ready: {}", out.seen());
    assert_eq!(shards_with_flows(&a).len(), SHARDS_A as usize, "the child's flows are on every shard of A");
    assert_eq!(flows_of(&b).len(), 16);
    let t = Instant::now();
    child.kill();
    wait_for("B's application told of the dead application's 16 flows", || echo_b.closed() == 16);
    wait_for("A holding no flow of the dead application", || flows_of(&a).is_empty());
    wait_for("B holding no flow of it", || flows_of(&b).is_empty());
    eprintln!("a dead application's 16 flows on 2 shards were gone from both daemons in {:?}", t.elapsed());

    // Flows on every shard of both: A's clients (a channel per A shard) to B's listener, B's
    // clients (a channel per B shard) to a listener on A. Then B shuts down.
    let echo_a = Echo::start(&a, PORTS[1]);
    let (_ma, mut a_clients) = connect_all(&a, IP_B, PORTS[0], SHARDS_A as usize, 4);
    let (_mb, mut b_clients) = connect_all(&b, IP_A, PORTS[1], SHARDS_B as usize, 4);
    assert_eq!(shards_with_flows(&a).len(), SHARDS_A as usize, "flows on every shard of A");
    assert_eq!(shards_with_flows(&b).len(), SHARDS_B as usize, "flows on every shard of B");
    let (na, nb) = (4 * SHARDS_A as usize, 4 * SHARDS_B as usize);
    assert_eq!((flows_of(&a).len(), flows_of(&b).len()), (na + nb, na + nb));
    let st = b.stop();
    assert!(st.success(), "B exited with {st}: {}", b.log_text());
    // A's clients are told of every flow; B's applications see their channels close.
    for (ch, fs) in &mut a_clients {
        assert_eq!(flow_endings(ch, fs.len()), fs.len(), "A's client flows to the stopped daemon ended");
    }
    wait_for("A's listener application told of B's client flows", || echo_a.closed() == nb as u64);
    for (ch, fs) in &mut b_clients {
        let mut buf = [0u8; 16];
        let t = Instant::now();
        loop {
            match ch.recv(&mut buf) {
                Err(_) => break,
                Ok(_) => assert!(t.elapsed() < LIMIT, "B's channel with {} flows still open", fs.len()),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    wait_for("A holding no flow", || flows_of(&a).is_empty());
    echo_a.finish();
    echo_b.finish();
    a.stop_log();
}
