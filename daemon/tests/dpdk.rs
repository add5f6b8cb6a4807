//! machnetd on DPDK ports (built with `--features dpdk`): two daemons joined by `net_memif`
//! with one and with two shards each, and two daemons on `net_af_packet` over a veth pair
//! between network namespaces, with the Linux kernel as an independent peer and faults
//! injected on the link. Start-up errors are clear and exit non-zero.
#![cfg(feature = "dpdk")]

mod common;
#[path = "../../net/tests/dpdk_common/mod.rs"]
mod dpdk_common;

use common::*;
use dpdk_common::{
    ip, ip_output, is_child, raw_socket, recv_raw, require_root_and_ip, say, send_raw, ChildProc, Netns,
};
use machnet::testing::process::{libmachnet_dir, output_within};
use machnet_net::wire::{IcmpEchoKind, IcmpEchoRepr, IcmpPacket, Ipv4Packet, Ipv4Repr};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 888;

/// Two daemons joined by memif (A is the memif server and starts first), `threads` shards each.
fn memif_pair(dir: &TempDir, threads: u32, extra: &str) -> (Daemon, Daemon) {
    let sock = dir.0.join("memif.sock");
    let ext = |role: &str| {
        format!(
            r#""backend": "dpdk", "idle": "adaptive",
               "dpdk": {{"device": "net_memif0,role={role},id=0,socket={},socket-abstract=no"}} {extra}"#,
            sock.display()
        )
    };
    let mut a = Daemon::spawn("memif-a", IP_A, MAC_A, threads, &ext("server"), None);
    // The server creates the socket; the client needs it.
    a.wait_until("its memif socket", |_| sock.exists());
    let mut b = Daemon::spawn("memif-b", IP_B, MAC_B, threads, &ext("client"), None);
    a.wait_ready();
    b.wait_ready();
    (a, b)
}

/// Stops both daemons together (a memif peer must not poll while the other unmaps its rings)
/// and returns their logs.
fn stop_both(mut a: Daemon, mut b: Daemon) -> (String, String) {
    a.terminate();
    b.terminate();
    for d in [&mut a, &mut b] {
        let st = d.wait_exit(Duration::from_secs(20));
        assert!(st.success(), "machnetd {} exited with {st}: {}", d.ip, d.log_text());
    }
    (a.log_text(), b.log_text())
}

/// The first line of `log` containing `needle`.
fn log_line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
}

/// The number just before `needle` in `line`.
fn num_before(line: &str, needle: &str) -> u64 {
    let end = line.find(needle).unwrap_or_else(|| panic!("{needle:?} not in {line:?}"));
    line[..end].split_whitespace().last().unwrap().trim_start_matches(',').parse().unwrap()
}

/// The per-shard summary machnetd logs at exit: (flows opened, handed out, handed in).
fn shard_summary(log: &str, shard: usize) -> (u64, u64, u64) {
    let line = log_line(log, &format!("machnet-shard{shard}: "));
    (num_before(line, " flows opened"), num_before(line, " handed to other shards"), num_before(line, " from them"))
}

fn every_size_class(a: &Daemon, b: &Daemon, classes: &[(usize, u64, u64)]) {
    let total: u64 = classes.iter().map(|c| c.1).sum();
    let server = echo_server_on(b, PORT, total);
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let t = Instant::now();
    let flow = ch.connect(a.ip, b.ip, PORT).unwrap();
    eprintln!("connect (with ARP) took {:?}", t.elapsed());
    for (i, &(size, n, window)) in classes.iter().enumerate() {
        let t = Instant::now();
        ping_pong(&mut ch, flow, i as u64, size, n, window);
        eprintln!("{n} x {size} B echoed in {:?}", t.elapsed());
    }
    // Exactly once: nothing more arrives.
    let mut buf = [0u8; 16];
    assert!(ch.recv_blocking(&mut buf, Some(Duration::from_millis(200))).unwrap().is_none(), "a duplicate arrived");
    assert_eq!(server.join().unwrap(), total);
}

#[test]
fn memif_hello_world_and_every_size_class_both_ways() {
    let lib = libmachnet_dir();
    let dir = TempDir::new("memif1");
    let exe = build_hello(&dir.0, &lib);
    let (a, b) = memif_pair(&dir, 1, "");
    c_client_to_rust_server(&exe, &lib, &a, &b);
    every_size_class(&a, &b, &[(1, 2000, 32), (1024, 2000, 32), (65_536, 300, 8), (8 << 20, 8, 1)]);
    let (la, lb) = stop_both(a, b);
    assert!(la.contains("stopped") && lb.contains("stopped"));
}

#[test]
fn memif_two_shards_hand_frames_to_their_owners() {
    let dir = TempDir::new("memif2");
    let (a, b) = memif_pair(&dir, 2, "");
    // One listener on B (its first channel: shard 0); two clients on A, on shards 0 and 1.
    // memif's queue i meets the peer's queue i and memif has no RSS: SYNs and data from A's
    // shard 1 arrive on B's shard 1 and must be handed to shard 0, and B's answers arrive on
    // A's shard 0 and must be handed to shard 1.
    let server = echo_server_on(&b, PORT, 2 * 500);
    let apps: Vec<_> = (0..2).map(|_| a.app()).collect();
    let mut chans: Vec<_> = apps.iter().map(|m| m.attach().unwrap()).collect();
    assert!(a.wait_log("shard 1: serving channel", Duration::from_secs(5)), "channels spread over A's shards");
    let workers: Vec<_> = chans
        .drain(..)
        .enumerate()
        .map(|(i, mut ch)| {
            std::thread::spawn(move || {
                let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
                ping_pong(&mut ch, flow, i as u64, 1000 + i * 7000, 500, 8);
                (ch, flow)
            })
        })
        .collect();
    let mut chans: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(server.join().unwrap(), 1000);
    // The application on shard 1 sends on the other's flow (on shard 0): not permitted, as on
    // one shard.
    let keeper = echo_server_on(&b, PORT + 1, u64::MAX);
    let victim = chans[0].0.connect(IP_A, IP_B, PORT + 1).unwrap();
    let intruder = &mut chans[1].0;
    intruder.send(victim, b"forged").unwrap();
    let t = std::time::Instant::now();
    // (The server is done: FlowClosed events of the intruder's own flow may come first.)
    let ev = loop {
        match intruder.poll_event() {
            Some(ev) if ev.kind == machnet::ops::EventKind::TxRefused => break ev,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(1)),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no refusal event");
    };
    assert_eq!(ev.status, machnet::ops::Status::NotPermitted);
    drop(keeper);
    drop(chans);
    drop(apps);
    let (la, lb) = stop_both(a, b);
    let (a0, a1) = (shard_summary(&la, 0), shard_summary(&la, 1));
    let (b0, b1) = (shard_summary(&lb, 0), shard_summary(&lb, 1));
    eprintln!("A shards {a0:?} {a1:?}; B shards {b0:?} {b1:?} (flows opened, handed out, handed in)");
    assert_eq!((a0.0, a1.0), (2, 1), "one client flow on each of A's shards, and the victim on shard 0");
    // Both ping-pong flows live with the listener on B's shard 0; the keeper's shard depends on
    // when B's controller saw the first server's channel go.
    assert!(b0.0 >= 2 && b0.0 + b1.0 == 3, "B's accepted flows by shard: {} and {}", b0.0, b1.0);
    assert!(b1.1 >= 500 && b0.2 >= 500, "B's shard 1 handed A's shard-1 traffic to shard 0");
    assert!(a0.1 >= 500 && a1.2 >= 500, "A's shard 0 handed B's answers to shard 1");
}

/// Two namespaces joined by a veth pair; the kernel of namespace B also has an address on
/// its end (198.18.0.3) and is an independent peer for ARP and ICMP.
struct Veth {
    ns: Netns,
    va: String,
    vb: String,
}

fn veth() -> Veth {
    require_root_and_ip();
    let ns = Netns::create(&["afpa", "afpb"]);
    let pid = std::process::id();
    let (va, vb) = (format!("mnafa{pid}"), format!("mnafb{pid}"));
    ip(&["-n", ns.name(0), "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", ns.name(1)]);
    ip(&["-n", ns.name(1), "addr", "add", "198.18.0.3/24", "dev", &vb]);
    ip(&["-n", ns.name(0), "link", "set", &va, "up"]);
    ip(&["-n", ns.name(1), "link", "set", &vb, "up"]);
    Veth { ns, va, vb }
}

#[test]
fn af_packet_with_the_kernel_as_peer_and_faults_on_the_link() {
    if is_child() {
        return;
    }
    let v = veth();
    let fault = r#", "fault": {"loss": 0.05, "reorder": 0.05, "duplicate": 0.01, "reorder_delay_us": 200}"#;
    let ext = |iface: &str| {
        format!(
            r#""backend": "dpdk", "idle": "adaptive", "dpdk": {{"device": "net_af_packet0,iface={iface}"}} {fault}"#
        )
    };
    let mut a = Daemon::spawn("afp-a", IP_A, MAC_A, 1, &ext(&v.va), Some(v.ns.name(0)));
    let mut b = Daemon::spawn("afp-b", IP_B, MAC_B, 1, &ext(&v.vb), Some(v.ns.name(1)));
    a.wait_ready();
    b.wait_ready();
    // One EAL lcore (the main one): no worker threads, no start-up hand-shake with them.
    assert!(a.log_text().contains("DPDK EAL arguments: -l "), "{}", a.log_text());
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", a.pid()))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
        .collect();
    assert!(!threads.iter().any(|t| t.starts_with("rte-worker")), "{threads:?}");

    // The kernel in B's namespace resolves A by ARP and pings it (through A's lossy link:
    // the child retries).
    let mut k = ChildProc::spawn("child_kernel_ping", &[("MN_PEER", IP_A.to_string())], Some(v.ns.name(1)));
    k.expect("pinged", Duration::from_secs(60));
    k.wait_success(Duration::from_secs(30));
    let neigh = ip_output(&["-n", v.ns.name(1), "neigh", "show", &IP_A.to_string()]);
    assert!(neigh.contains(MAC_A), "the kernel learned machnetd's MAC by ARP: {neigh:?}");

    // 5 % loss, 5 % reordering and 1 % duplication each way: every message arrives once, in
    // order, intact.
    every_size_class(&a, &b, &[(1, 500, 16), (1024, 500, 16), (65_536, 100, 4), (1 << 20, 5, 1)]);
    let (la, lb) = (a.stop_log(), b.stop_log());
    for log in [&la, &lb] {
        let faults = log_line(log, "faults injected");
        eprintln!("{faults}");
        // The faults were real: frames were lost, duplicated and reordered, and recovered from.
        assert!(
            num_before(faults, " of ") > 50
                && num_before(faults, " duplicated") > 5
                && num_before(faults, " reordered") > 50
                && num_before(faults, " duplicate packets received") > 0,
            "{faults}"
        );
        assert!(num_before(log_line(log, "machnet-shard0: "), " retransmissions") > 0, "{log}");
    }
    drop(v.ns);
}

#[test]
#[ignore = "child process of af_packet_with_the_kernel_as_peer_and_faults_on_the_link"]
fn child_kernel_ping() {
    if !is_child() {
        return;
    }
    let peer: Ipv4Addr = dpdk_common::env("MN_PEER").parse().unwrap();
    let sw = machnet_net::wire::ChecksumCaps::software();
    let fd = raw_socket(libc::IPPROTO_ICMP);
    let ident = std::process::id() as u16;
    let mut buf = [0u8; 2048];
    let mut answered = 0;
    for seq in 0..3u16 {
        let data: Vec<u8> = (0..56).map(|j| (seq as usize + j) as u8).collect();
        let req = IcmpEchoRepr { kind: IcmpEchoKind::Request, ident, seq_no: seq, data: &data };
        let mut pkt = vec![0u8; req.buffer_len()];
        req.emit(&mut pkt, sw).unwrap();
        'tries: for _ in 0..20 {
            send_raw(fd, peer, &pkt);
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                let Some(n) = recv_raw(fd, &mut buf) else { continue };
                let ipp = Ipv4Packet::new_checked(&buf[..n]).unwrap();
                let Ok(iph) = Ipv4Repr::parse(&ipp, sw) else { continue };
                let Ok(icmp) = IcmpPacket::new_checked(ipp.payload()) else { continue };
                let Ok(echo) = IcmpEchoRepr::parse(&icmp, sw) else { continue };
                if echo.kind == IcmpEchoKind::Reply && echo.ident == ident && echo.seq_no == seq {
                    assert_eq!(iph.src_addr, peer);
                    assert_eq!(echo.data, &data[..], "the reply carries the request's payload");
                    answered += 1;
                    break 'tries;
                }
            }
        }
    }
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    assert_eq!(answered, 3, "every ping answered");
    say("pinged");
}

#[test]
fn start_up_errors_are_clear() {
    let dir = TempDir::new("dpdk-errors");
    let run = |ext: &str| {
        let cfg = dir.0.join("c.json");
        std::fs::write(
            &cfg,
            format!(r#"{{"machnet_config": {{"{MAC_A}": {{"ip": "{IP_A}"}}}}, "machnet_rs": {{{ext}}}}}"#),
        )
        .unwrap();
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_machnetd"))
                .arg("--config")
                .arg(&cfg)
                .arg("--ctrl-sock")
                .arg(dir.0.join("s.sock")),
            RUN,
            &format!("machnetd ({ext})"),
        );
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A driver DPDK does not have.
    let (code, err) = run(r#""backend": "dpdk", "dpdk": {"device": "net_nosuchdriver0"}"#);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("DPDK EAL initialisation failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // An EAL argument it rejects.
    let (code, err) = run(r#""backend": "dpdk", "dpdk": {"device": "net_null0", "eal_args": ["--no-such-flag"]}"#);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("DPDK EAL initialisation failed"), "{err}");
    // A bad argument for a real driver.
    let (code, err) = run(r#""backend": "dpdk", "dpdk": {"device": "net_memif0,role=sideways"}"#);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("DPDK"), "{err}");
    // A memif server nobody connects to: the link wait ends with a clear error.
    let sock = dir.0.join("lonely.sock");
    let (code, err) = run(&format!(
        r#""backend": "dpdk", "dpdk": {{"device": "net_memif0,role=server,socket={},socket-abstract=no", "link_timeout_ms": 300}}"#,
        sock.display()
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("link"), "{err}");
    assert!(!dir.0.join("s.sock").exists(), "no control socket left behind");
    // Start-up is bounded as a whole: a step that takes longer than `start_timeout_ms` (here
    // the link wait, given 10 s) ends the daemon with an error naming it.
    let t = std::time::Instant::now();
    let (code, err) = run(&format!(
        r#""backend": "dpdk", "dpdk": {{"device": "net_memif0,role=server,socket={},socket-abstract=no", "link_timeout_ms": 10000, "start_timeout_ms": 500}}"#,
        sock.display()
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("DPDK start-up did not finish within 0.5 s (stuck in device set-up)"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "the watchdog ended it: {:?}", t.elapsed());
}

/// The contention harness (`common::traffic`, see daemon/tests/contention.rs) on DPDK ports,
/// with CPU hogs on every CPU: nothing lost or failed, `machnetctl` prompt, and SIGTERM stops
/// both daemons within a second (a memif pair is stopped together, as it must be).
fn under_hogs(a: Daemon, b: Daemon, what: &str) {
    let hogs = common::load::Hogs::start(2);
    eprintln!("{what}: {} CPU hogs; traffic for {} s", hogs.count(), common::traffic::secs());
    let t = common::traffic::run_traffic(&a, &b, common::traffic::secs(), (0, 1));
    t.stop_servers.store(true, std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let (la, lb) = stop_both(a, b);
    let took = start.elapsed();
    eprintln!("{what}: SIGTERM to exit under load: {took:?}");
    assert!(took < Duration::from_secs(1), "{what}: the daemons took {took:?} to stop:\n{la}\n{lb}");
    for h in t.servers {
        common::traffic::join_within(h, Duration::from_secs(10), "an echo server");
    }
    drop(hogs);
}

#[test]
fn memif_under_cpu_hogs_loses_nothing() {
    let dir = TempDir::new("memif-hogs");
    let (a, b) = memif_pair(&dir, 1, "");
    under_hogs(a, b, "memif");
}

#[test]
fn af_packet_under_cpu_hogs_loses_nothing() {
    if is_child() {
        return;
    }
    let v = veth();
    let ext = |iface: &str| {
        format!(r#""backend": "dpdk", "idle": "adaptive", "dpdk": {{"device": "net_af_packet0,iface={iface}"}}"#)
    };
    let mut a = Daemon::spawn("afp-hogs-a", IP_A, MAC_A, 1, &ext(&v.va), Some(v.ns.name(0)));
    let mut b = Daemon::spawn("afp-hogs-b", IP_B, MAC_B, 1, &ext(&v.vb), Some(v.ns.name(1)));
    a.wait_ready();
    b.wait_ready();
    under_hogs(a, b, "af_packet");
    drop(v.ns);
}
