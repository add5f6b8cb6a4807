//! Deaths, noticed within a second whatever the load: SIGKILL each party at random points of a
//! transfer, 20 rounds, with CPU hogs on every CPU (the contention harness's conditions):
//!
//! * the receiving application: the sender's flow is reset and its application told;
//! * the sending application: the receiver's application is told;
//! * an application's own daemon: its blocking receive and its sends fail with `DaemonGone`
//!   (the C library: −1 with `errno` `ECONNRESET`); a daemon restarted on the same address
//!   serves connects at once;
//! * the peer's daemon: the flow fails after the peer timeout (1 s here), and a connect right
//!   after the peer restarts works.
//!
//! After the rounds the daemons' buffers, file descriptors and memory are back where they were.

mod common;

use common::load::{pin_thread, Hogs};
use common::*;
use machnet::client::{Channel, Error as ClientError, Machnet};
use machnet::layout::MachnetFlow;
use machnet::ops::EventKind;
use machnet::testing::process::{output_within, ChildGuard, Lines};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sink's port (B), where child senders send.
const PORT: u16 = 888;
/// Where child receivers listen (B).
const CHILD_PORT: u16 = 889;
/// How soon a death must be noticed.
const NOTICE: Duration = Duration::from_secs(1);
/// The peer timeout the daemons run with here (5 s by default), so that a silent peer's flow
/// fails within the test's patience.
const EXTRA: &str = r#", "transport": {"peer_timeout_ms": 1000}"#;

/// A pseudo-random delay in `[lo, hi)` ms for round `r` (deterministic per round).
fn delay(r: u64, lo: u64, hi: u64) -> Duration {
    let x = r.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ 0x5bd1_e995;
    Duration::from_millis(lo + x % (hi - lo))
}

/// The child applications of this test (the test binary run again): `sender` connects to
/// `MACHNET_TEST_REMOTE`:888 and sends 64 KiB messages forever; `receiver` listens on 889 and
/// reads forever. Each prints `ready <port>` once its flow or listener is up.
#[test]
#[ignore = "entry point of child processes spawned by the tests below"]
fn child_app() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let role = std::env::var("MACHNET_TEST_ROLE").unwrap();
    let local: std::net::Ipv4Addr = std::env::var("MACHNET_TEST_LOCAL").unwrap().parse().unwrap();
    let m = Machnet::connect(Path::new(&sock)).unwrap();
    let mut ch = m.attach().unwrap();
    match role.as_str() {
        "sender" => {
            let remote = std::env::var("MACHNET_TEST_REMOTE").unwrap().parse().unwrap();
            let flow = ch.connect(local, remote, PORT).unwrap();
            println!("ready {}", flow.src_port);
            let data = vec![0x5au8; 65_536];
            loop {
                match ch.send(flow, &data) {
                    Ok(()) | Err(ClientError::RingFull) | Err(ClientError::NoBuffers) => std::thread::yield_now(),
                    Err(e) => panic!("child sender: {e}"),
                }
            }
        }
        _ => {
            ch.listen(local, CHILD_PORT).unwrap();
            println!("ready {CHILD_PORT}");
            let mut buf = vec![0u8; 1 << 17];
            loop {
                let _ = ch.recv_blocking(&mut buf, Some(Duration::from_secs(1)));
            }
        }
    }
}

fn spawn_child(d: &Daemon, role: &str, remote: Option<std::net::Ipv4Addr>) -> (ChildGuard, Lines) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_app", "--ignored", "--nocapture"])
        .env("MACHNET_TEST_SOCK", &d.sock)
        .env("MACHNET_TEST_ROLE", role)
        .env("MACHNET_TEST_LOCAL", d.ip.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(r) = remote {
        c.env("MACHNET_TEST_REMOTE", r.to_string());
    }
    let mut g = ChildGuard::spawn(&mut c, &format!("child {role}"));
    let mut out = Lines::new(g.child().stdout.take().unwrap());
    assert!(
        out.wait_for(Duration::from_secs(20), |l| l.contains("ready ")).is_some(),
        "child {role} did not get ready in 20 s: {}",
        out.seen()
    );
    (g, out)
}

/// Waits until `ch` reports an event for `flow` (or any flow with `flow == None`) that says it
/// ended; returns its kind and how long it took.
fn wait_end(ch: &mut Channel, flow: Option<MachnetFlow>, since: Instant, limit: Duration) -> (EventKind, Duration) {
    let mut buf = vec![0u8; 1 << 17];
    loop {
        // Received messages are drained so that the events behind them are read.
        while let Ok(Some(_)) = ch.recv(&mut buf) {}
        while let Some(ev) = ch.poll_event() {
            if matches!(ev.kind, EventKind::FlowClosed | EventKind::FlowFailed) && flow.is_none_or(|f| f == ev.flow) {
                return (ev.kind, since.elapsed());
            }
        }
        assert!(since.elapsed() < limit, "no flow-closed or flow-failed event within {limit:?}");
        let _ = ch.wait_rx(Some(Duration::from_millis(5)));
    }
}

/// Waits until the daemon holds no channel of a gone application and no flow besides `keep`
/// flows; returns the channels document.
fn wait_reclaimed(d: &Daemon, keep: usize, since: Instant, limit: Duration) -> Value {
    loop {
        let c = d.ctl_within("channels", Duration::from_secs(5));
        let s = d.ctl_within("status", Duration::from_secs(5));
        let lingering = c["channels"].as_array().unwrap().iter().filter(|x| x["lingering"] == true).count();
        let flows = s["status"]["flows"].as_u64().unwrap_or(u64::MAX) as usize;
        if lingering == 0
            && flows <= keep
            && s["status"]["channels"].as_u64() == Some(c["channels"].as_array().unwrap().len() as u64)
        {
            return c;
        }
        assert!(since.elapsed() < limit, "{}: not reclaimed within {limit:?}: {c} {s}", d.ip);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every channel's buffers are all back in their pools (nothing held by a dead party).
fn assert_buffers_home(c: &Value, who: &str) {
    for ch in c["channels"].as_array().unwrap() {
        assert_eq!(ch["tx_engine"], 0, "{who}: transmit buffers held by the engine: {ch}");
        assert_eq!(ch["rx_engine"], 0, "{who}: receive buffers held by the engine: {ch}");
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The daemon's heap in use, KiB (as its allocator counts it, from `machnetctl status`): a leak
/// shows here exactly, where resident memory also moves with pages first touched and with what
/// the allocator keeps of freed memory.
fn heap_kib(d: &Daemon) -> u64 {
    d.ctl_within("status", Duration::from_secs(5))["status"]["heap_bytes"].as_u64().unwrap_or(0) / 1024
}

/// An echo-less sink on `d`:888 (the peer of child senders), kept by the test.
fn sink(d: &Daemon) -> (Machnet, Channel) {
    let m = d.app();
    let mut ch = m.attach().unwrap();
    ch.listen(d.ip, PORT).unwrap();
    (m, ch)
}

#[test]
fn every_party_killed_at_random_points_is_noticed_within_a_second() {
    let (mut a, mut b) = Daemon::pair_pinned(EXTRA);
    let _hogs = Hogs::start(2);
    pin_thread(0);
    let (_mb, mut sink_b) = sink(&b);
    // Per daemon: (pid, fds, heap KiB) after the tenth round, compared after every later round
    // of the same process (a restarted daemon starts a new baseline): file descriptors must
    // come back exactly, the heap within 256 KiB (what is allocated while the count is taken).
    let mut baseline: [Option<(u32, usize, u64)>; 2] = [None, None];
    let mut growth = [(0i64, 0i64); 2];
    let mut worst = [Duration::ZERO; 4];
    // Twenty rounds of application deaths (receiver and sender alternating), then twenty of
    // daemon deaths (an application's own, and its peer's, alternating).
    let app_rounds: u64 = std::env::var("MACHNET_DEATH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for r in 0..app_rounds + 20 {
        let kind = if r < app_rounds { r % 2 } else { 2 + r % 2 };
        match kind {
            0 => {
                // The receiving application dies: the sender on A is told.
                let (child, _out) = spawn_child(&b, "receiver", None);
                let ma = a.app();
                let mut ch = ma.attach().unwrap();
                let flow = ch.connect(IP_A, IP_B, CHILD_PORT).unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let data = vec![1u8; 65_536];
                let t = Instant::now();
                while t.elapsed() < delay(r, 20, 400) {
                    let _ = ch.send(flow, &data);
                    let _ = ch.poll_event();
                }
                drop(child);
                let killed = Instant::now();
                let (ev, took) = wait_end(&mut ch, Some(flow), killed, NOTICE * 3);
                assert!(took < NOTICE, "round {r}: the sender learned of the receiver's death after {took:?} ({ev:?})");
                worst[0] = worst[0].max(took);
                stop.store(true, Ordering::Relaxed);
                wait_reclaimed(&b, 0, killed, NOTICE * 3);
                ch.detach().unwrap();
            }
            1 => {
                // The sending application dies: the receiver on B is told.
                let (child, _out) = spawn_child(&a, "sender", Some(IP_B));
                let t = Instant::now();
                let mut buf = vec![0u8; 1 << 17];
                while t.elapsed() < delay(r, 20, 400) {
                    let _ = sink_b.recv_blocking(&mut buf, Some(Duration::from_millis(5)));
                }
                drop(child);
                let killed = Instant::now();
                let (_, took) = wait_end(&mut sink_b, None, killed, NOTICE * 3);
                assert!(took < NOTICE, "round {r}: the receiver learned of the sender's death after {took:?}");
                worst[1] = worst[1].max(took);
                wait_reclaimed(&a, 0, killed, NOTICE * 3);
            }
            2 => {
                // An application's own daemon dies: its calls fail, promptly.
                let ma = a.app();
                let mut rx = ma.attach().unwrap();
                let mut tx = ma.attach().unwrap();
                let flow = tx.connect(IP_A, IP_B, PORT).unwrap();
                let blocked = std::thread::spawn(move || {
                    pin_thread(0);
                    let mut buf = [0u8; 64];
                    let r = rx.recv_blocking(&mut buf, None);
                    (r, Instant::now())
                });
                let t = Instant::now();
                while t.elapsed() < delay(r, 20, 300) {
                    let _ = tx.send(flow, &[2u8; 1000]);
                }
                a.kill();
                let killed = Instant::now();
                let send_err = loop {
                    match tx.send(flow, &[2u8; 1000]) {
                        Err(e @ ClientError::DaemonGone) => break e,
                        _ => assert!(killed.elapsed() < NOTICE * 3, "sends still succeed after the daemon died"),
                    }
                };
                let send_took = killed.elapsed();
                let (res, at) = join_within(blocked, NOTICE * 3);
                let recv_took = at.saturating_duration_since(killed);
                assert_eq!(res, Err(ClientError::DaemonGone), "round {r}: the blocked receive");
                assert_eq!(send_err, ClientError::DaemonGone);
                assert!(
                    send_took < NOTICE && recv_took < NOTICE,
                    "round {r}: send {send_took:?}, receive {recv_took:?}"
                );
                worst[2] = worst[2].max(send_took).max(recv_took);
                drop((tx, ma));
                // A new daemon on the same address serves connects at once.
                a.respawn_pinned(0);
                let m2 = a.app();
                let mut c2 = m2.attach().unwrap();
                let t = Instant::now();
                let f2 =
                    c2.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("round {r}: connect after a restart: {e}"));
                eprintln!("round {r}: connect {:?} after the daemon's restart", t.elapsed());
                c2.send(f2, b"after restart").unwrap();
                let _ = wait_end_msg(&mut sink_b, b"after restart");
                c2.close(f2).unwrap();
            }
            _ => {
                // The peer's daemon dies: the flow fails after the peer timeout; a connect
                // right after the peer restarts works.
                let ma = a.app();
                let mut ch = ma.attach().unwrap();
                let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
                let t = Instant::now();
                while t.elapsed() < delay(r, 20, 300) {
                    let _ = ch.send(flow, &[3u8; 1000]);
                }
                b.kill();
                let killed = Instant::now();
                let (ev, took) = wait_end(&mut ch, Some(flow), killed, Duration::from_secs(10));
                assert_eq!(ev, EventKind::FlowFailed, "round {r}");
                eprintln!("round {r}: the flow to the dead peer failed after {took:?}");
                b.respawn_pinned(1);
                let (_m, s) = sink(&b);
                sink_b = s;
                let t = Instant::now();
                let f2 = ch
                    .connect(IP_A, IP_B, PORT)
                    .unwrap_or_else(|e| panic!("round {r}: connect to a restarted peer: {e}"));
                eprintln!("round {r}: connect {:?} after the peer's restart", t.elapsed());
                ch.send(f2, b"after restart").unwrap();
                let _ = wait_end_msg(&mut sink_b, b"after restart");
                ch.detach().unwrap();
                std::mem::forget(_m);
            }
        }
        let ca = wait_reclaimed(&a, 0, Instant::now(), Duration::from_secs(5));
        let cb = wait_reclaimed(&b, 0, Instant::now(), Duration::from_secs(5));
        assert_buffers_home(&ca, "A");
        assert_buffers_home(&cb, "B");
        for (i, d) in [&a, &b].into_iter().enumerate() {
            let pid = d.pid();
            if std::env::var_os("MACHNET_TEST_VERBOSE").is_some() {
                eprintln!("round {r}: {} fds {} heap {} KiB", d.ip, fds(pid), heap_kib(d));
            }
            match baseline[i] {
                Some((p, f0, m0)) if p == pid => {
                    // The control connection of the last machnetctl may still be closing.
                    let t = Instant::now();
                    let (f, m) = loop {
                        let (f, m) = (fds(pid), heap_kib(d));
                        if (f <= f0 && m <= m0 + 256) || t.elapsed() > Duration::from_secs(2) {
                            break (f, m);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    growth[i] = (growth[i].0.max(f as i64 - f0 as i64), growth[i].1.max(m as i64 - m0 as i64));
                    assert!(f <= f0, "round {r}: daemon {}: file descriptors grew from {f0} to {f}", d.ip);
                    assert!(m <= m0 + 256, "round {r}: daemon {}: its heap grew from {m0} to {m} KiB", d.ip);
                }
                _ if r >= 9 => baseline[i] = Some((pid, fds(pid), heap_kib(d))),
                _ => {}
            }
        }
    }
    eprintln!("largest growth within one daemon's life (fds, heap KiB): A {:?}, B {:?}", growth[0], growth[1]);
    eprintln!(
        "slowest notice: receiver death {:?}, sender death {:?}, own daemon death {:?}",
        worst[0], worst[1], worst[2]
    );
}

/// Receives on `ch` until a message with exactly `want` arrives (others are ignored).
fn wait_end_msg(ch: &mut Channel, want: &[u8]) -> MachnetFlow {
    let mut buf = vec![0u8; 1 << 17];
    let t = Instant::now();
    loop {
        if let Ok(Some((n, from))) = ch.recv_blocking(&mut buf, Some(Duration::from_millis(100))) {
            if &buf[..n] == want {
                return from;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no {:?} within 10 s", String::from_utf8_lossy(want));
    }
}

fn join_within<T>(h: std::thread::JoinHandle<T>, limit: Duration) -> T {
    let t = Instant::now();
    while !h.is_finished() {
        assert!(t.elapsed() < limit, "a thread did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.join().unwrap()
}

/// The C library: an application spinning on `machnet_recv` whose daemon is killed gets −1
/// with `errno` `ECONNRESET` within a second, and so does its next send; it is not killed by
/// SIGPIPE on the way.
#[test]
fn a_c_application_learns_of_its_daemons_death_through_errno() {
    let (mut a, b) = Daemon::pair("");
    let (_mb, _sink) = sink(&b);
    let lib = machnet::testing::process::libmachnet_dir();
    let tmp = TempDir::new("death-c");
    let exe = tmp.0.join("daemon_death");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/daemon_death.c");
    let out = output_within(
        Command::new("cc")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&exe)
            .arg(&src)
            .arg(format!("-I{}", channel_dir().join("include").display()))
            .arg(format!("-L{}", lib.display()))
            .arg("-lmachnet"),
        RUN,
        "cc",
    );
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut g = ChildGuard::spawn(
        Command::new(&exe)
            .args([&IP_A.to_string(), &IP_B.to_string()])
            .env("MACHNET_CTRL_SOCK", &a.sock)
            .env("LD_LIBRARY_PATH", &lib)
            .stdout(Stdio::piped()),
        "C application",
    );
    let mut lines = Lines::new(g.child().stdout.take().unwrap());
    assert!(lines.wait_for(Duration::from_secs(20), |l| l == "ready").is_some(), "not ready: {}", lines.seen());
    std::thread::sleep(Duration::from_millis(100));
    a.kill();
    let killed = Instant::now();
    let line = lines
        .wait_for(Duration::from_secs(5), |l| l.starts_with("recv "))
        .unwrap_or_else(|| panic!("the C application reported nothing within 5 s: {}", lines.seen()));
    let took = killed.elapsed();
    assert!(line.starts_with("recv -1 errno 104 "), "{line}");
    assert!(line.contains("; send -1 errno 104;"), "{line}");
    assert!(line.contains("the daemon is gone"), "{line}");
    assert!(took < NOTICE, "noticed after {took:?}");
    let st = g.wait_within(Duration::from_secs(10));
    assert!(st.success(), "the application exited with {st} (SIGPIPE would be signal 13)");
}
