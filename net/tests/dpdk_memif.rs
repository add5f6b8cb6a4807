//! Two processes joined by `net_memif` with two queue pairs: frames of several sizes both ways
//! (one at a time and in full bursts), content verified on both sides, then the coordinated
//! shutdown memif needs (both stop polling, then both stop their ports, then the client closes
//! and exits, then the server), and nothing left behind. A stale socket file from a "killed" server is in place at the start.
//!
//! And the same two processes with sender-side steering (`PeerSteering`, what `machnetd`'s
//! `dpdk.memif_steering` sets up): every frame reaches the queue the receiver's RSS picks for
//! it, both ways, and the steered receive and transmit paths allocate nothing.
#![cfg(feature = "dpdk")]

mod dpdk_common;

use dpdk_common::{assert_no_dpdk_leftovers, env, is_child, say, stdin_lines, wait_for, ChildProc, TempDir};
use machnet_net::port::dpdk::{
    memif_vdev, unique_file_prefix, DeviceConfig, DeviceSpec, DpdkDevice, DpdkPort, Eal, EalArgs, PeerSteering,
};
use machnet_net::port::udp::rss_queue;
use machnet_net::port::{Burst, PacketBuf, Port, BURST};
use machnet_net::rss::Rss;
use machnet_net::testutil::{count_allocs, CountingAlloc};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const T: Duration = Duration::from_secs(120);
const QUEUES: u16 = 2;
const SIZES: [usize; 8] = [60, 64, 128, 256, 512, 1024, 1500, 1514];
const SINGLE_REPEATS: usize = 20;
/// Frames the client sends per queue and size: single frames, then one full burst.
const PER_SIZE: usize = SINGLE_REPEATS + BURST;
const DATA_FRAMES: usize = QUEUES as usize * SIZES.len() * PER_SIZE;

const KIND_DATA: u8 = 1;
const KIND_BYE: u8 = 2;
/// Header: Ethernet (14), kind (1), tag (4).
const HDR: usize = 19;

fn pattern(tag: u32, i: usize, reply: bool) -> u8 {
    let b = (tag as usize).wrapping_mul(131).wrapping_add(i) as u8;
    if reply {
        b ^ 0x5a
    } else {
        b
    }
}

fn write_frame(b: &mut impl PacketBuf, kind: u8, tag: u32, len: usize) {
    let s = b.storage_mut();
    s[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0xbb]);
    s[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0xaa]);
    s[12..14].copy_from_slice(&[0x88, 0xb5]);
    s[14] = kind;
    s[15..19].copy_from_slice(&tag.to_be_bytes());
    for (i, x) in s[HDR..len].iter_mut().enumerate() {
        *x = pattern(tag, i, false);
    }
    b.set_len(len);
}

/// (kind, tag) of a frame whose payload matches the request (`reply = false`) or reply pattern.
#[track_caller]
fn read_frame(f: &[u8], reply: bool) -> (u8, u32) {
    assert!(f.len() >= HDR, "short frame {}", f.len());
    assert_eq!(&f[12..14], &[0x88, 0xb5]);
    let tag = u32::from_be_bytes(f[15..19].try_into().unwrap());
    if f[14] == KIND_DATA {
        for (i, &x) in f[HDR..].iter().enumerate() {
            assert_eq!(x, pattern(tag, i, reply), "frame {tag} ({} bytes): byte {i}", f.len());
        }
    }
    (f[14], tag)
}

#[test]
fn memif_two_processes_exchange_frames_and_shut_down_cleanly() {
    if is_child() {
        return;
    }
    let (verified, received) = run_pair("child_memif_server", "child_memif_client", false, |_, _| ());
    assert_eq!(verified, DATA_FRAMES, "client verified every reply");
    assert_eq!(received, DATA_FRAMES, "server verified every request");
}

/// Sender-side steering between two 2-shard sides: each side transmits every frame on the
/// queue pair that leads to the peer's queue its RSS (the peer's key, a round-robin table)
/// picks, so every frame is received by the port of the shard that owns its flow; checked
/// frame by frame on both sides over many 5-tuples. The steady-state rounds (both sides'
/// steered `rx_burst` over every peer shard's ring and `tx_burst` grouping frames by target
/// queue) allocate nothing.
#[test]
fn memif_steered_ports_deliver_to_the_receivers_rss_queue_and_allocate_nothing() {
    if is_child() {
        return;
    }
    let (verified, received) = run_pair("child_steered_server", "child_steered_client", true, |server, client| {
        let s: u64 = server.expect("allocs", T).parse().unwrap();
        let c: u64 = client.expect("allocs", T).parse().unwrap();
        assert_eq!(c, 0, "the client's steered rx/tx rounds allocated");
        assert_eq!(s, 0, "the server's steered rx/tx loop allocated");
        // Both of the server's queues were used, so both of the client's transmit queues were.
        let spread = server.expect("per-queue", T);
        assert!(spread.split(' ').all(|n| n.parse::<usize>().unwrap() > STEER_FRAMES / 8), "server queues: {spread}");
        let spread = client.expect("per-queue", T);
        assert!(spread.split(' ').all(|n| n.parse::<usize>().unwrap() > STEER_FRAMES / 8), "client queues: {spread}");
    });
    assert_eq!(verified, STEER_FRAMES, "client verified every reply");
    assert_eq!(received, STEER_FRAMES, "server verified every request");
}

/// Starts a memif server child and a client child, lets `during` read what they report while
/// they run, and goes through memif's coordinated shutdown; returns the two "quiesced" counts
/// (client, server).
fn run_pair(
    server_test: &str,
    client_test: &str,
    steer: bool,
    during: impl FnOnce(&mut ChildProc, &mut ChildProc),
) -> (usize, usize) {
    // One pair at a time: two pairs at once (four busy-polling processes on this machine's two
    // cores) stretched memif's disconnect race below (1 run in 8 logged "Invalid memory").
    static ONE_PAIR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    // One directory per test all the same (both tests are in one process).
    let dir = TempDir::new(if steer { "memif-steered" } else { "memif" });
    let sock = dir.path().join("memif.sock");
    // A stale socket file, as a SIGKILLed server leaves it: the server must remove it.
    std::fs::write(&sock, b"").unwrap();
    let (sp, cp) = (unique_file_prefix("mn-memif-s"), unique_file_prefix("mn-memif-c"));
    let env = |prefix: &str, cpu: &str| {
        vec![
            ("MN_PREFIX", prefix.to_string()),
            ("MN_SOCKET", sock.display().to_string()),
            ("MN_CPU", cpu.to_string()),
            ("MN_STEER", if steer { "1" } else { "0" }.to_string()),
        ]
    };
    // Server first: a client's start fails if the socket is not there yet.
    let mut server = ChildProc::spawn(server_test, &env(&sp, "0"), None);
    server.expect("listening", T);
    let mut client = ChildProc::spawn(client_test, &env(&cp, "1"), None);
    server.expect("up", T);
    client.expect("up", T);
    during(&mut server, &mut client);

    // Both stop polling first (the client after the server echoed its last frame) ...
    let verified: usize = client.expect("quiesced", T).parse().unwrap();
    let received: usize = server.expect("quiesced", T).parse().unwrap();
    // ... then both stop their ports, then both close and exit.
    server.send("stop");
    client.send("stop");
    server.expect("stopped", T);
    client.expect("stopped", T);
    // ... then one closes after the other. DPDK 22.11's memif handles the peer's disconnect
    // message on its interrupt thread (memif_disconnect frees the shared regions) with no lock
    // against the main thread's rte_eth_dev_close doing the same: two sides closing at once
    // can free a region twice ("EAL: Error: Invalid memory" from rte_free, seen 1 in 3 runs).
    // The server closes once it has seen the client's disconnect (link down) and settled.
    client.send("exit");
    client.expect("done", T);
    client.wait_success(T);
    server.send("exit");
    server.expect("done", T);
    server.wait_success(T);

    assert!(!sock.exists(), "the memif server removed its socket file");
    assert_no_dpdk_leftovers(&sp);
    assert_no_dpdk_leftovers(&cp);
    (verified, received)
}

struct Side {
    eal: Eal,
    dev: DpdkDevice,
    ports: Vec<DpdkPort>,
}

fn start(server: bool) -> Side {
    let sock = PathBuf::from(env("MN_SOCKET"));
    if server {
        let _ = std::fs::remove_file(&sock); // stale socket from an earlier run
    }
    let spec = DeviceSpec::parse(&memif_vdev(0, server, &sock));
    let cpu: u32 = env("MN_CPU").parse().unwrap();
    let eal = Eal::init(EalArgs::new(&env("MN_PREFIX")).device(&spec).main_lcore(cpu).build()).expect("EAL init");
    if server {
        say("listening");
    }
    let steering = (std::env::var("MN_STEER").as_deref() == Ok("1")).then(|| {
        let (own, peer) = if server { (SERVER_KEY, CLIENT_KEY) } else { (CLIENT_KEY, SERVER_KEY) };
        PeerSteering { key: own.to_vec(), peer_queues: QUEUES, peer_key: peer.to_vec() }
    });
    let own_key = steering.as_ref().map(|st| st.key.clone());
    let cfg = DeviceConfig {
        queues: QUEUES,
        link_timeout: Some(Duration::from_secs(60)),
        peer_steering: steering,
        ..DeviceConfig::default()
    };
    let mut dev = DpdkDevice::open(&eal, &spec, &cfg).expect("open memif");
    assert_eq!(dev.driver(), "net_memif");
    // memif has no RSS of its own; steered, the port reports what the peer steers with (this
    // side's key over its queues) for the transport's source-port search.
    assert_eq!(dev.capabilities().rss.as_ref().map(|r| r.key.clone()), own_key);
    let ports = dev.take_ports();
    say("up");
    Side { eal, dev, ports }
}

/// The shutdown protocol after polling stopped.
fn finish(side: Side, quiesced: usize, server: bool) {
    let Side { eal, mut dev, ports } = side;
    let stdin = stdin_lines();
    say(&format!("quiesced {quiesced}"));
    wait_for(&stdin, "stop");
    drop(ports);
    // With four queue pairs (steered), stopping both devices before either closes made DPDK
    // 22.11's memif free memory twice in 3 runs of 10 ("EAL: Error: Invalid memory", in the
    // client's EAL cleanup or the server's close); machnetd's order, each side stopping and
    // closing in one go (the client first, the server once its link went down), did not in
    // 15. The two-queue test keeps the stop-first order it has always passed with.
    let steered = std::env::var("MN_STEER").as_deref() == Ok("1");
    if !steered {
        dev.stop().expect("stop");
    }
    say("stopped");
    wait_for(&stdin, "exit");
    if server {
        // The client closed first: wait until its disconnect reached us (the link goes down at
        // the start of memif_disconnect on the interrupt thread), then let that finish.
        let t = Instant::now();
        while dev.link().expect("link status").up {
            assert!(t.elapsed() < T, "the client's disconnect never reached the server");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if steered {
        dev.stop().expect("stop");
    }
    dev.close().expect("close");
    eal.shutdown().expect("EAL shutdown");
    say("done");
}

#[test]
#[ignore = "child process of memif_two_processes_exchange_frames_and_shut_down_cleanly"]
fn child_memif_server() {
    if !is_child() {
        return;
    }
    let mut side = start(true);
    let mut received = 0usize;
    let deadline = Instant::now() + T;
    let mut rx = Burst::new();
    'poll: while Instant::now() < deadline {
        for port in side.ports.iter_mut() {
            port.rx_burst(&mut rx);
            let mut tx: Burst<_> = Burst::new();
            let mut bye = false;
            for mut b in rx.drain(..) {
                let (kind, _) = read_frame(b.frame(), false);
                if kind == KIND_DATA {
                    received += 1;
                    let len = b.len();
                    for x in b.frame_mut()[HDR..len].iter_mut() {
                        *x ^= 0x5a;
                    }
                } else {
                    bye = true;
                }
                tx.push(b);
            }
            while !tx.is_empty() {
                port.tx_burst(&mut tx);
            }
            if bye {
                // The reply to the last frame is out: stop polling.
                break 'poll;
            }
        }
    }
    finish(side, received, true);
}

#[test]
#[ignore = "child process of memif_two_processes_exchange_frames_and_shut_down_cleanly"]
fn child_memif_client() {
    if !is_child() {
        return;
    }
    let mut side = start(false);
    let mut tag = 0u32;
    let mut verified = 0usize;
    for port in side.ports.iter_mut() {
        for &len in &SIZES {
            // One frame at a time.
            for _ in 0..SINGLE_REPEATS {
                let mut b = port.alloc().expect("alloc");
                write_frame(&mut b, KIND_DATA, tag, len);
                let mut tx = Burst::new();
                tx.push(b);
                while port.tx_burst(&mut tx) == 0 {}
                let got = recv(port, 1);
                assert_eq!(read_frame(got[0].frame(), true), (KIND_DATA, tag));
                assert_eq!(got[0].len(), len);
                verified += 1;
                tag += 1;
            }
            // A full burst; replies come back in order.
            let first = tag;
            let mut tx = Burst::new();
            for _ in 0..BURST {
                let mut b = port.alloc().expect("alloc");
                write_frame(&mut b, KIND_DATA, tag, len);
                tx.push(b);
                tag += 1;
            }
            while !tx.is_empty() {
                port.tx_burst(&mut tx);
            }
            for (i, b) in recv(port, BURST).into_iter().enumerate() {
                assert_eq!(read_frame(b.frame(), true), (KIND_DATA, first + i as u32));
                assert_eq!(b.len(), len);
                verified += 1;
            }
        }
    }
    // The last frame: once its echo is back, the server no longer polls.
    let port = &mut side.ports[0];
    let mut b = port.alloc().unwrap();
    write_frame(&mut b, KIND_BYE, tag, 60);
    let mut tx = Burst::new();
    tx.push(b);
    while port.tx_burst(&mut tx) == 0 {}
    assert_eq!(read_frame(recv(port, 1)[0].frame(), true).0, KIND_BYE);
    finish(side, verified, false);
}

/// Exactly `n` frames from `port` (fails after 10 s).
#[track_caller]
fn recv(port: &mut DpdkPort, n: usize) -> Vec<<DpdkPort as Port>::Buf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::with_capacity(n);
    let mut rx = Burst::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "queue {}: {} of {n} frames arrived", port.queue(), got.len());
        port.rx_burst(&mut rx);
        got.extend(rx.drain(..));
    }
    assert_eq!(got.len(), n, "no extra frames");
    got
}

/// The steering keys: each side's "NIC key" (what the peer hashes frames to it with).
const SERVER_KEY: &[u8; 40] = b"machnet-rs steering test: server key 001";
const CLIENT_KEY: &[u8; 40] = b"machnet-rs steering test: client key 002";
/// Steered rounds: warm-up, then counted.
const STEER_WARMUP: usize = 50;
const STEER_ROUNDS: usize = 2_000;
/// Frames the client sends in the steered test: a burst per port per round.
const STEER_FRAMES: usize = (STEER_WARMUP + STEER_ROUNDS) * QUEUES as usize * BURST;
/// Ethernet (14) + IPv4 (20) + UDP (8) + tag (4).
const STEER_HDR: usize = 46;
const STEER_LEN: usize = 128;

/// An IPv4/UDP frame (checksums not filled: memif does not look) whose source port varies with
/// `tag`, so the frames spread over the receiver's queues.
fn write_udp_frame(b: &mut impl PacketBuf, tag: u32) {
    let s = b.storage_mut();
    s[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0xbb]);
    s[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0xaa]);
    s[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut s[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((STEER_LEN - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let sport = 1024 + (tag.wrapping_mul(2_654_435_761) >> 20) as u16;
    s[34..36].copy_from_slice(&sport.to_be_bytes());
    s[36..38].copy_from_slice(&31850u16.to_be_bytes());
    s[38..40].copy_from_slice(&((STEER_LEN - 34) as u16).to_be_bytes());
    s[40..42].fill(0);
    s[42..46].copy_from_slice(&tag.to_be_bytes());
    for (i, x) in s[STEER_HDR..STEER_LEN].iter_mut().enumerate() {
        *x = pattern(tag, i, false);
    }
    b.set_len(STEER_LEN);
}

/// The tag of a steered frame, its payload checked against the request or reply pattern.
#[track_caller]
fn read_udp_frame(f: &[u8], reply: bool) -> u32 {
    assert_eq!(f.len(), STEER_LEN);
    let tag = u32::from_be_bytes(f[42..46].try_into().unwrap());
    for (i, &x) in f[STEER_HDR..].iter().enumerate() {
        assert_eq!(x, pattern(tag, i, reply), "frame {tag}: byte {i}");
    }
    tag
}

/// The RSS a side's peer steers with toward it: `key` over a round-robin table of its queues.
fn rss_of(key: &[u8]) -> Rss {
    Rss::new(key, &Rss::round_robin_reta(128, QUEUES)).expect("a valid key")
}

#[test]
#[ignore = "child process of memif_steered_ports_deliver_to_the_receivers_rss_queue_and_allocate_nothing"]
fn child_steered_server() {
    if !is_child() {
        return;
    }
    let mut side = start(true);
    let own = rss_of(SERVER_KEY);
    let mut per_queue = [0usize; QUEUES as usize];
    let deadline = Instant::now() + T;
    let (allocs, received) = count_allocs(|| {
        let mut received = 0usize;
        let mut rx = Burst::new();
        let mut tx: Burst<_> = Burst::new();
        while received < STEER_FRAMES && Instant::now() < deadline {
            for (q, port) in side.ports.iter_mut().enumerate() {
                port.rx_burst(&mut rx);
                for mut b in rx.drain(..) {
                    let t = read_udp_frame(b.frame(), false);
                    assert_eq!(usize::from(rss_queue(&own, b.frame())), q, "request {t} on the wrong queue");
                    received += 1;
                    per_queue[q] += 1;
                    for x in b.frame_mut()[STEER_HDR..].iter_mut() {
                        *x ^= 0x5a;
                    }
                    tx.push(b);
                }
                while !tx.is_empty() {
                    port.tx_burst(&mut tx);
                }
            }
        }
        received
    });
    say(&format!("allocs {allocs}"));
    say(&format!("per-queue {}", per_queue.map(|n| n.to_string()).join(" ")));
    finish(side, received, true);
}

#[test]
#[ignore = "child process of memif_steered_ports_deliver_to_the_receivers_rss_queue_and_allocate_nothing"]
fn child_steered_client() {
    if !is_child() {
        return;
    }
    let mut side = start(false);
    let own = rss_of(CLIENT_KEY);
    let mut per_queue = [0usize; QUEUES as usize];
    let mut tag = 0u32;
    let mut verified = 0usize;
    // One round: a burst from each port (to whichever server queues the frames hash to), then
    // every reply, each on the port the client's RSS picks for it.
    let mut round = |ports: &mut [DpdkPort], per_queue: &mut [usize; QUEUES as usize]| {
        let first = tag;
        for port in ports.iter_mut() {
            let mut tx = Burst::new();
            for _ in 0..BURST {
                let mut b = port.alloc().expect("alloc");
                write_udp_frame(&mut b, tag);
                tx.push(b);
                tag += 1;
            }
            while !tx.is_empty() {
                port.tx_burst(&mut tx);
            }
        }
        let want = ports.len() * BURST;
        let mut seen = [false; QUEUES as usize * BURST];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut rx = Burst::new();
        while got < want {
            assert!(Instant::now() < deadline, "{got} of {want} replies of the round from tag {first} arrived");
            for (q, port) in ports.iter_mut().enumerate() {
                port.rx_burst(&mut rx);
                for b in rx.drain(..) {
                    let t = read_udp_frame(b.frame(), true);
                    assert_eq!(usize::from(rss_queue(&own, b.frame())), q, "reply {t} on the wrong queue");
                    let i = t.checked_sub(first).map(|i| i as usize).filter(|&i| i < want);
                    let i = i.unwrap_or_else(|| panic!("reply {t} outside the round from {first}"));
                    assert!(!seen[i], "reply {t} twice");
                    seen[i] = true;
                    got += 1;
                    per_queue[q] += 1;
                    port.free(b);
                }
            }
        }
        got
    };
    for _ in 0..STEER_WARMUP {
        verified += round(&mut side.ports, &mut per_queue);
    }
    let (allocs, n) = count_allocs(|| (0..STEER_ROUNDS).map(|_| round(&mut side.ports, &mut per_queue)).sum::<usize>());
    verified += n;
    say(&format!("allocs {allocs}"));
    say(&format!("per-queue {}", per_queue.map(|n| n.to_string()).join(" ")));
    finish(side, verified, false);
}
