//! Applications in child processes (this test binary re-executed with `MACHNET_TEST_ROLE`),
//! the test engine in this process: the full stack across process boundaries.
//!
//! The children reach the engine through `MACHNET_CTRL_SOCK` and `Machnet::init()`.

mod common;

use std::collections::VecDeque;
use std::io::{IoSliceMut, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cuts, gather, pattern, scatter, Rng};
use machnet::client::{Channel, Error, Machnet};
use machnet::layout::{MachnetFlow, MSG_MAX_LEN};
use machnet::ops::EventKind;
use machnet::testing::process::{self_test, ChildGuard, Lines};
use machnet::testing::{TestEngine, TestEngineConfig};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ENTRY: &str = "child_entry";

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Entry point of the child processes; not a test of its own (ignored in normal runs).
#[test]
#[ignore = "entry point for child processes spawned by the other tests"]
fn child_entry() {
    match std::env::var("MACHNET_TEST_ROLE").as_deref() {
        Ok("roundtrip") => role_roundtrip(),
        Ok("echo-threads") => role_echo_threads(),
        Ok("kill-me") => role_kill_me(),
        r => panic!("unknown role {r:?}"),
    }
}

/// Sends `small` messages of 1 B..64 KiB (log-uniform) and `big` messages of up to 8 MiB on an
/// echo flow with random gather lists, receives each echo with a random scatter list, and
/// checks every byte. Keeps many messages in flight.
fn role_roundtrip() {
    let small = env_usize("MSGS", 1 << 20);
    let big = env_usize("BIG", 64);
    let m = Machnet::init().expect("init");
    let mut ch = m.attach().expect("attach");
    let flow = ch.connect(LOCAL, REMOTE, 7000).expect("connect");
    let t0 = Instant::now();
    let (bytes, n) = pump(&mut ch, flow, small, big, 0xC0FFEE);
    println!("roundtrip ok: {n} messages, {bytes} bytes each way, {:.1} s", t0.elapsed().as_secs_f64());
}

/// The pipelined echo loop shared by the roles. Returns (bytes, messages).
fn pump(ch: &mut Channel, flow: MachnetFlow, small: usize, big: usize, seed: u64) -> (u64, usize) {
    let pat = pattern(MSG_MAX_LEN + 65536, seed);
    let mut rng = Rng(seed ^ 0x55);
    let total = small + big;
    let size = |rng: &mut Rng, i: usize| {
        if i < small {
            rng.log_uniform(65536)
        } else if i == small {
            MSG_MAX_LEN
        } else {
            rng.range(1, MSG_MAX_LEN)
        }
    };
    let mut rbuf = vec![0u8; MSG_MAX_LEN + 4096];
    let mut inflight: VecDeque<(usize, usize)> = VecDeque::new();
    let mut inflight_bytes = 0usize;
    let (mut sent, mut got, mut bytes) = (0usize, 0usize, 0u64);
    let mut next: Option<(usize, usize)> = None;
    while got < total {
        let mut progress = false;
        // Send while the window allows (at most 16 MiB and 256 messages in flight).
        while sent < total && inflight.len() < 256 {
            let (off, len) = *next.get_or_insert_with(|| {
                let len = size(&mut rng, sent);
                (rng.range(0, 65536), len)
            });
            if inflight_bytes + len > 2 * MSG_MAX_LEN && !inflight.is_empty() {
                break;
            }
            let msg = &pat[off..off + len];
            match ch.sendmsg(flow, &gather(msg, &cuts(&mut rng, len, 16)), 0) {
                Ok(()) => {
                    inflight.push_back((off, len));
                    inflight_bytes += len;
                    sent += 1;
                    next = None;
                    progress = true;
                }
                Err(Error::RingFull | Error::NoBuffers) => break,
                Err(e) => panic!("send {sent}: {e}"),
            }
        }
        // Receive everything that is there.
        while let Some(&(off, len)) = inflight.front() {
            let c = cuts(&mut rng, len, 16);
            let (head, rest) = rbuf.split_at_mut(len);
            let mut iov = scatter(head, &c);
            iov.push(IoSliceMut::new(&mut rest[..4096]));
            match ch.recvmsg(&mut iov).expect("recv") {
                None => break,
                Some((n, from)) => {
                    assert_eq!((n, from), (len, flow.reversed()), "message {got}");
                    assert!(rbuf[..len] == pat[off..off + len], "content of message {got} ({len} B)");
                    inflight.pop_front();
                    inflight_bytes -= len;
                    got += 1;
                    bytes += len as u64;
                    progress = true;
                }
            }
        }
        if !progress {
            // Nothing to do until the engine echoes: sleep on the doorbell.
            ch.wait_rx(Some(Duration::from_millis(100))).expect("wait");
        }
    }
    (bytes, got)
}

/// Two threads with an echo channel each, plus two channels talking to each other through a
/// listener; then the connector closes its flow and the listener side is told.
fn role_echo_threads() {
    let idx = env_usize("CHILD_INDEX", 0);
    let msgs = env_usize("MSGS", 20_000);
    let m = Machnet::init().expect("init");
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut ch = m.attach().expect("attach");
                let f = ch.connect(LOCAL, REMOTE, 7000 + t).expect("connect");
                pump(&mut ch, f, msgs, 0, (idx * 10 + t as usize) as u64)
            })
        })
        .collect();
    // Listener and connector in two more threads.
    let port = 20_000 + idx as u16;
    let mut server = m.attach().expect("attach");
    server.listen(LOCAL, port).expect("listen");
    let mc = m.clone();
    let client = std::thread::spawn(move || {
        let mut c = mc.attach().expect("attach");
        let f = c.connect(LOCAL, LOCAL, port).expect("connect to listener");
        let mut buf = [0u8; 64];
        for i in 0..1000u32 {
            c.send(f, &i.to_le_bytes()).unwrap();
            let (n, from) = c.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap().expect("reply");
            assert_eq!((n, from), (4, f.reversed()));
            assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), i + 1);
        }
        c.close(f).unwrap();
        f
    });
    let mut buf = [0u8; 64];
    let mut peer = None;
    for i in 0..1000u32 {
        let (n, from) = server.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap().expect("request");
        assert_eq!((n, u32::from_le_bytes(buf[..4].try_into().unwrap())), (4, i));
        peer = Some(from);
        server.send(from.reversed(), &(i + 1).to_le_bytes()).unwrap();
    }
    let cf = client.join().unwrap();
    assert_eq!(peer, Some(cf), "the server sees src = the connector");
    let end = Instant::now() + Duration::from_secs(30);
    let ev = loop {
        if let Some(ev) = server.poll_event() {
            break ev;
        }
        assert!(Instant::now() < end, "no FlowClosed event");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((ev.kind, ev.flow), (EventKind::FlowClosed, cf.reversed()));
    for w in workers {
        let (_, n) = w.join().unwrap();
        assert_eq!(n, msgs);
    }
    println!("echo-threads ok");
}

/// Leaves buffers everywhere (RX messages unread, a message held by the engine, messages
/// queued on the TX ring), says READY, then keeps sending until killed.
fn role_kill_me() {
    let m = Machnet::init().expect("init");
    let mut ch = m.attach().expect("attach");
    let echo = ch.connect(LOCAL, REMOTE, 7000).unwrap();
    let hold = ch.connect(LOCAL, REMOTE, 9).unwrap();
    for _ in 0..10 {
        ch.send(echo, &[1u8; 3000]).unwrap(); // echoed back, never read: 30 RX buffers app-held
    }
    ch.send(hold, &[2u8; 5000]).unwrap(); // 4 TX buffers engine-held, TX ring stalls behind it
    for _ in 0..20 {
        ch.send(echo, &[3u8; 2000]).unwrap(); // 40 TX buffers queued
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    loop {
        let _ = ch.send(echo, &[4u8; 100]);
        std::hint::spin_loop();
    }
}

/// This test binary as an application child in `role`, reaching `eng`.
fn app_command(eng: &TestEngine, role: &str, extra: &[(&str, String)]) -> Command {
    let mut c = self_test(ENTRY);
    c.env("MACHNET_CTRL_SOCK", eng.socket_path()).env("MACHNET_TEST_ROLE", role);
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

/// Starts an application child whose output [`wait_ok`] collects.
fn start_app(eng: &TestEngine, role: &str, extra: &[(&str, String)]) -> ChildGuard {
    ChildGuard::spawn(
        app_command(eng, role, extra).stdout(Stdio::piped()).stderr(Stdio::piped()),
        &format!("child {role}"),
    )
}

/// Waits for `child` up to `limit` (killing it and failing at the deadline); fails unless it
/// exits 0. Returns its stdout.
#[track_caller]
fn wait_ok(child: ChildGuard, limit: Duration) -> String {
    let out = child.output_within(limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed: {}\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn rust_client_round_trips_2p20_messages_and_64_large_ones_across_processes() {
    let eng = TestEngine::start(TestEngineConfig::default()).unwrap();
    let child = start_app(&eng, "roundtrip", &[]);
    let out = wait_ok(child, Duration::from_secs(900));
    println!("{out}");
    assert!(out.contains("roundtrip ok: 1048640 messages"), "{out}");
    // The child exited: its channel was reclaimed with nothing lost and no violation.
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 1));
    let r = eng.reclaimed()[0];
    assert_eq!(r.after.tx_msgs, (1 << 20) + 64);
    assert_eq!(r.after.violations_total(), 0);
    assert_eq!((r.after.tx_reclaimed, r.after.rx_free), (r.after.tx_bufs, r.after.rx_bufs));
}

#[test]
fn several_apps_with_several_channels_and_threads_at_once() {
    let eng = TestEngine::start(TestEngineConfig::default()).unwrap();
    let children: Vec<_> = (0..3)
        .map(|i| {
            // The third app does without membarrier: its doorbell handshake uses SeqCst stores.
            let nomb = if i == 2 { "1" } else { "0" };
            let extra = [("CHILD_INDEX", i.to_string()), ("MACHNET_NO_MEMBARRIER", nomb.to_string())];
            start_app(&eng, "echo-threads", &extra)
        })
        .collect();
    for c in children {
        let out = wait_ok(c, Duration::from_secs(600));
        assert!(out.contains("echo-threads ok"), "{out}");
    }
    // 3 apps x 4 channels, all detached or reclaimed, none with a violation or a lost buffer.
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 12 && e.live_channels() == 0));
    let apps: std::collections::HashSet<_> = eng.reclaimed().iter().map(|r| r.app).collect();
    assert_eq!(apps.len(), 3);
    for r in eng.reclaimed() {
        assert_eq!(r.after.violations_total(), 0, "{r:?}");
        assert_eq!((r.after.tx_reclaimed, r.after.rx_free), (r.after.tx_bufs, r.after.rx_bufs));
    }
}

#[test]
fn sigkill_mid_send_reclaims_every_buffer() {
    let eng = TestEngine::start(TestEngineConfig::default()).unwrap();
    let mut child = ChildGuard::spawn(
        app_command(&eng, "kill-me", &[]).stdout(Stdio::piped()),
        "child kill-me (before its SIGKILL)",
    );
    let mut out = Lines::new(child.child().stdout.take().unwrap());
    out.expect(&mut child, Duration::from_secs(60), "READY", |l| l.contains("READY"));
    // Wait until the engine holds the held message and the app holds the 10 echoes.
    let pid = child.id();
    assert!(eng.wait_until(Duration::from_secs(30), |e| {
        e.snapshot().iter().any(|s| s.stats.tx_engine >= 4 && s.stats.rx_app >= 30)
    }));
    let before = eng.snapshot()[0].stats;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let st = child.wait_within(Duration::from_secs(10));
    assert!(!st.success());
    let app = eng.registrations().into_iter().find(|(_, c)| c.pid == pid).map(|(a, _)| a).unwrap();
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().iter().any(|r| r.app == app)));
    let r = eng.reclaimed().into_iter().find(|r| r.app == app).unwrap();
    let (tx, rx) = (r.after.tx_bufs, r.after.rx_bufs);
    // Where the buffers were when the app died...
    assert_eq!(r.reclaim.tx_app + r.reclaim.tx_engine, tx);
    assert_eq!(r.reclaim.rx_app + r.reclaim.rx_engine, rx);
    assert!(r.reclaim.tx_engine >= 4, "{r:?}");
    assert!(r.reclaim.tx_app >= 40, "{r:?}");
    assert_eq!(r.reclaim.rx_app, 30, "{r:?}");
    assert!(before.tx_engine >= 4);
    // ... and all of them are back.
    assert_eq!((r.after.tx_reclaimed, r.after.tx_app, r.after.tx_engine), (tx, 0, 0));
    assert_eq!((r.after.rx_free, r.after.rx_app, r.after.rx_engine), (rx, 0, 0));
    assert_eq!(eng.live_channels(), 0);
}
