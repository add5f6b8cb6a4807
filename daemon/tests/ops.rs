//! Operations: machnetctl against running daemons, the access list, and hostile applications
//! next to a well-behaved one on the same shard.

mod common;

use common::*;
use machnet::ctrl::{CtrlClient, KIND_CREATE_CHANNEL, KIND_REGISTER};
use machnet::engine::AppFds;
use machnet::layout::{CtrlEntry, MachnetFlow, MsgDesc, Part, MSG_MAX_LEN};
use machnet::testing::process::{output_within, self_test, ChildGuard, Lines};
use machnet::testing::RawView;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 888;
const NOBODY: u32 = 65534;

/// Waits (20 s at most) until `machnetctl channels` satisfies `ok`.
fn wait_channels(sock: &Path, what: &str, ok: impl Fn(&Value) -> bool) {
    let t = Instant::now();
    loop {
        let d = ctl_json(sock, "channels");
        if ok(&d["channels"]) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "waited 20 s for {what}: {d}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn machnetctl_shows_status_shards_flows_channels_apps_and_arp() {
    let (a, b) = Daemon::pair("");
    // The echo server stays (its leaving would close the flow).
    let server = echo_server_on(&b, PORT, u64::MAX);
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch, flow, 1, 1000, 50, 4);

    let out = machnetctl(&a.sock, &["status"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    for needle in ["198.18.0.1", "02:00:00:00:00:01", "udp", "1 apps, 1 channels, 1 flows"] {
        assert!(s.contains(needle), "status lacks {needle:?}:\n{s}");
    }
    let s = text(&machnetctl(&a.sock, &["flows"]));
    let row = s.lines().find(|l| l.contains(&format!("198.18.0.2:{PORT}"))).unwrap_or_else(|| panic!("{s}"));
    assert!(row.contains(&format!("198.18.0.1:{}", flow.src_port)) && row.contains("Established"), "{row}");
    assert!(row.contains(&std::process::id().to_string()), "the owner's pid: {row}");
    let s = text(&machnetctl(&a.sock, &["channels"]));
    assert!(s.lines().nth(1).is_some_and(|l| l.contains("open")), "{s}");
    let s = text(&machnetctl(&a.sock, &["apps"]));
    assert!(s.contains(&std::process::id().to_string()), "{s}");
    let s = text(&machnetctl(&a.sock, &["arp"]));
    assert!(s.contains("198.18.0.2") && s.contains("02:00:00:00:00:02"), "{s}");
    let s = text(&machnetctl(&a.sock, &["shards"]));
    for needle in ["busy%", "control", "rx", "channels", "timers", "tx"] {
        assert!(s.contains(needle), "shards lacks {needle:?}:\n{s}");
    }

    // JSON carries the same, as numbers.
    let d = ctl_json(&a.sock, "flows");
    let f = &d["flows"][0];
    assert_eq!(f["tx_msgs"], 50);
    assert_eq!(f["rx_msgs"], 50);
    assert_eq!(f["tx_bytes"], 50_000);
    assert_eq!(d["status"]["flows"], 1);
    assert_eq!(d["shards"][0]["endpoint"]["rx_messages"], 50);
    let c = ctl_json(&a.sock, "channels");
    assert_eq!(c["channels"][0]["tx_msgs"], 50);
    assert_eq!(c["channels"][0]["tx_app"], c["channels"][0]["tx_bufs"], "every TX buffer is back with the app");

    // --watch refreshes until interrupted: read three refreshes, then SIGINT; it exits 0.
    let mut child = ChildGuard::spawn(
        machnetctl_command(&a.sock, &["--watch", "0.2", "status"]).stdout(Stdio::piped()),
        "machnetctl --watch",
    );
    let mut lines = Lines::new(child.child().stdout.take().unwrap());
    for refresh in 1..=3 {
        lines.expect(
            &mut child,
            Duration::from_secs(30),
            &format!("refresh {refresh} (a \"machnetd pid\" line)"),
            |l| l.contains("machnetd pid"),
        );
    }
    child.signal(libc::SIGINT);
    let status = child.wait_within(Duration::from_secs(10));
    assert!(status.success(), "exit status after SIGINT: {status:?}");

    // No daemon: a clear error.
    let out = machnetctl(Path::new("/nonexistent/machnet.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot reach machnetd at /nonexistent/machnet.sock"), "{}", text(&out));
    drop(ch);
    drop(b);
    let _ = server.join();
}

#[test]
fn a_shard_parks_while_an_application_does_not_read_and_loses_nothing() {
    // B's application listens and reads nothing; A sends more than B's receive ring holds
    // (64 entries). B's shard must stop delivering (back-pressure), park while it waits (not
    // spin on the full ring), and deliver everything, in order, once the application reads.
    let (a, b) = Daemon::pair(r#", "channel": {"ring_entries": 64}"#);
    let mb = b.app();
    let mut rx = mb.attach().unwrap();
    rx.listen(IP_B, PORT).unwrap();
    let ma = a.app();
    let mut tx = ma.attach().unwrap();
    let flow = tx.connect(IP_A, IP_B, PORT).unwrap();
    const N: u64 = 200;
    let mut msg = [0u8; 100];
    for k in 0..N {
        fill(&mut msg, 1, k);
        send_retry(&mut tx, flow, &msg);
    }
    wait_channels(&b.sock, "B's channel to fill", |c| c[0]["blocked"] == true);
    let parks = || ctl_json(&b.sock, "shards")["shards"][0]["parks"].as_u64().unwrap();
    let before = parks();
    std::thread::sleep(Duration::from_millis(500));
    let after = parks();
    assert!(
        after >= before + 10,
        "B's shard spun on the full ring instead of parking: {before} -> {after} parks in 500 ms"
    );
    let mut buf = [0u8; 200];
    for k in 0..N {
        let (len, from) = rx.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap().expect("message");
        assert_eq!((len, from), (msg.len(), flow), "from A, in order");
        check(&buf[..len], 1, k);
    }

    // Again, but the reader leaves without reading: once its channel is gone, nothing on B
    // waits for room any more, and B's shard parks for long stretches, not every 100 µs.
    let mut rx = mb.attach().unwrap();
    rx.listen(IP_B, PORT + 1).unwrap();
    let flow = tx.connect(IP_A, IP_B, PORT + 1).unwrap();
    for k in 0..N {
        fill(&mut msg, 2, k);
        send_retry(&mut tx, flow, &msg);
    }
    wait_channels(&b.sock, "the second channel to fill", |c| c[1]["blocked"] == true);
    rx.detach().unwrap();
    wait_channels(&b.sock, "the channel to be reclaimed", |c| c.as_array().unwrap().len() == 1);
    std::thread::sleep(Duration::from_millis(100));
    let before = parks();
    std::thread::sleep(Duration::from_millis(500));
    let after = parks();
    assert!(after < before + 100, "B's shard still rechecks every 100 µs: {before} -> {after} parks in 500 ms");
}

#[test]
fn access_list_and_socket_mode_refuse_other_users() {
    // Only uid 4242 (and root) may use A; B has no list.
    let (a, b) = Daemon::pair_with(r#", "access": {"allow_uids": [4242]}"#, "");
    let as_nobody =
        |sock: &Path| output_within(machnetctl_command(sock, &["status"]).uid(NOBODY), RUN, "machnetctl as nobody");
    let out = as_nobody(&a.sock);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not on its access list"), "{}", text(&out));
    assert!(a.wait_log("statistics refused: pid", Duration::from_secs(5)));
    // Registration is refused the same way (an application run as nobody).
    let out = output_within(
        self_test("child_register").env("MACHNET_TEST_SOCK", &a.sock).uid(NOBODY),
        RUN,
        "child_register as nobody",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused: not permitted"), "{}", text(&out));
    assert!(a.wait_log("registration refused: pid", Duration::from_secs(5)));
    assert_eq!(ctl_json(&a.sock, "status")["status"]["access_refused"], 2);
    // Root (this test) is always allowed; B has no list, so nobody may use it.
    assert!(machnetctl(&a.sock, &["status"]).status.success());
    assert!(as_nobody(&b.sock).status.success(), "{}", text(&as_nobody(&b.sock)));
    drop((a, b));

    let (c, _d) = Daemon::pair(r#", "access": {"socket_mode": "0600"}"#);
    let out = as_nobody(&c.sock);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("ermission denied"), "{}", text(&out));
}

#[test]
#[ignore = "entry point of a child process spawned by access_list_and_socket_mode_refuse_other_users"]
fn child_register() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    match machnet::client::Machnet::connect(Path::new(&sock)) {
        Err(e) => println!("refused: {e}"),
        Ok(_) => println!("registered"),
    }
}

/// An application that talks the control protocol itself and maps its channel raw.
struct Hostile {
    _conn: CtrlClient,
    raw: RawView,
    _fds: AppFds,
}

fn hostile(d: &Daemon) -> Hostile {
    let mut conn = CtrlClient::connect(&d.sock, Duration::from_secs(5)).unwrap();
    conn.call(KIND_REGISTER, 0).unwrap();
    let (_, fds) = conn.call(KIND_CREATE_CHANNEL, 0).unwrap();
    let mut it = fds.into_iter();
    let fds = AppFds { memfd: it.next().unwrap(), app_bell: it.next().unwrap(), engine_bell: it.next().unwrap() };
    // The layout, as the client library validates it.
    let dup = AppFds {
        memfd: fds.memfd.try_clone().unwrap(),
        app_bell: fds.app_bell.try_clone().unwrap(),
        engine_bell: fds.engine_bell.try_clone().unwrap(),
    };
    let lay = *machnet::client::Channel::from_fds(dup).unwrap().layout();
    let raw = RawView::map(std::os::fd::AsFd::as_fd(&fds.memfd), lay).unwrap();
    Hostile { _conn: conn, raw, _fds: fds }
}

fn ring(h: &Hostile) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write of a valid buffer to the eventfd the daemon gave us.
    unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&h._fds.engine_bell), one.as_ptr().cast(), 8) };
}

/// p50 and p99 of `n` 1 KiB round trips on `flow`, in µs.
fn rtts(ch: &mut machnet::client::Channel, flow: MachnetFlow, n: usize) -> (f64, f64) {
    let msg = [7u8; 1024];
    let mut buf = [0u8; 2048];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        send_retry(ch, flow, &msg);
        let (len, _) = ch.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("an echo");
        assert_eq!(&buf[..len], &msg[..], "the victim's echo is intact");
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[n / 2], v[n * 99 / 100])
}

#[test]
fn hostile_applications_lose_their_channels_and_nobody_else_notices() {
    let (a, b) = Daemon::pair(r#", "channel": {"buffers": 1024, "ring_entries": 256}"#);
    let server = echo_server_on(&b, PORT, u64::MAX);
    let m = a.app();
    let mut victim = m.attach().unwrap();
    let flow = victim.connect(IP_A, IP_B, PORT).unwrap();
    let (p50_before, p99_before) = rtts(&mut victim, flow, 2000);

    // Forgers, one per offence, on the same (only) shard as the victim.
    let forged = |h: &Hostile, d: MsgDesc| {
        h.raw.push_tx(d);
        ring(h);
    };
    let desc = |head, count, len| MsgDesc { flow, head, count, len, flags: 0, reserved: 0 };
    let bad_index = hostile(&a);
    forged(&bad_index, desc(1 << 30, 1, 10));
    let absurd_len = hostile(&a);
    forged(&absurd_len, desc(0, 1, MSG_MAX_LEN as u32 * 4));
    let bad_ctrl = hostile(&a);
    bad_ctrl.raw.push_sq(CtrlEntry { id: 5, op: 0xdead, ..Default::default() });
    ring(&bad_ctrl);
    // A valid message on the victim's flow: refused (not this channel's flow), not delivered.
    let thief = hostile(&a);
    thief.raw.set_buf(Part::TxPool, 0, 0, 5);
    thief.raw.write_bytes(thief.raw.buf_off(Part::TxPool, 0), b"stole");
    forged(&thief, desc(0, 1, 5));
    // A scribbler: random bytes over its whole region, again and again, while the victim works.
    let scribbler = hostile(&a);
    let during = std::thread::spawn(move || {
        let r = rtts(&mut victim, flow, 3000);
        (r, victim)
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let len = scribbler.raw.len();
    let mut rounds = 0u64;
    // 64 random 64-byte writes anywhere, then (`aim`) random garbage on one ring's producer
    // index.
    let mut scribble = |pause: bool, aim: Option<Part>| {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x as usize % (len - 64)) & !7;
            scribbler.raw.write_bytes(off, &x.to_le_bytes().repeat(8));
        }
        if let Some(part) = aim {
            scribbler.raw.write_u32(scribbler.raw.prod_off(part), (x >> 17) as u32);
        }
        ring(&scribbler);
        rounds += 1;
        if pause {
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    while !during.is_finished() {
        scribble(true, None);
    }
    let ((p50_during, p99_during), mut victim) = during.join().unwrap();
    // The scribbler goes on until the daemon notices, now with garbage aimed at the producer
    // indices of the rings the daemon reads too: only writes that land on what the daemon reads
    // are violations, and the victim's 3,000 round trips can be over after a few hundred random
    // rounds (80 ms beside stress-ng once: no hit; 6,000-30,000 rounds were needed then).
    let lost = |c: &Value| c["channels_closed_violation"].as_u64().unwrap() + c["channels_poisoned"].as_u64().unwrap();
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let d = ctl_json(&a.sock, "channels");
        let c = &d["shards"][0]["counters"];
        if lost(c) >= 4 {
            break;
        }
        assert!(Instant::now() < give_up, "the scribbler kept its channel through {rounds} rounds of garbage: {c}");
        for part in [Part::TxRing, Part::RxRetRing, Part::Sq] {
            scribble(false, Some(part));
        }
    }
    eprintln!(
        "victim RTT p50/p99 {p50_before:.0}/{p99_before:.0} us before, {p50_during:.0}/{p99_during:.0} us during ({rounds} scribbles)"
    );
    // The stated bound: the victim sees no error (checked per message above) and its p99 stays
    // within 4x of its own p99 before, plus 10 ms for this shared 2-vCPU machine's scheduling:
    // beside `stress-ng --cpu 2`, with the other tests of this file running at once and the
    // scribbler's own thread competing for the same two cores, a p99 of 7.9 ms (against 195 µs
    // before) was seen once in the whole suite's run; a daemon that served the victim only
    // after working through the scribbler's garbage would show seconds, not milliseconds.
    assert!(p99_during <= 4.0 * p99_before + 10_000.0, "p99 {p99_before:.0} -> {p99_during:.0} us");

    let d = ctl_json(&a.sock, "channels");
    let c = &d["shards"][0]["counters"];
    for reason in ["BufIndex", "MsgLength", "CtrlRequest"] {
        assert!(c["violations"][reason].as_u64().unwrap() >= 1, "{reason}: {c}");
    }
    assert!(lost(c) >= 4, "the three forgers and the scribbler lost their channels: {c}");
    assert!(c["tx_refused"].as_u64().unwrap() >= 1, "the thief's message was refused: {c}");
    // Left open: the victim's and the thief's (a refused send is not a protocol violation).
    let open: Vec<&Value> = d["channels"].as_array().unwrap().iter().filter(|c| c["lingering"] == false).collect();
    assert_eq!(open.len(), 2, "{d}");
    // Nothing reached the victim but its own echoes.
    let mut buf = [0u8; 64];
    assert!(victim.recv_blocking(&mut buf, Some(Duration::from_millis(200))).unwrap().is_none());
    // The daemon still serves new applications.
    let m2 = a.app();
    let mut ch2 = m2.attach().unwrap();
    let f2 = ch2.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch2, f2, 3, 100, 10, 1);
    drop((victim, ch2, bad_index, absurd_len, bad_ctrl, thief, scribbler));
    drop(b);
    let _ = server.join();
}
