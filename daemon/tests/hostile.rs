//! A hostile network in front of real daemons: an attacker that can put frames on the
//! daemon's link (here a third UDP tunnel peer of daemon B) floods SYNs from forged sources
//! while real clients connect and transfer.

mod common;

use common::*;
use machnet::testing::process::with_free_udp_ports;
use machnet_net::wire::{
    emit_arp, ArpOperation, ArpRepr, ChecksumCaps, EthernetAddress, FrameRepr, MachnetRepr, MsgFlags, PacketType,
    SackBitmap, FRAME_HEADER_LEN,
};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PORT: u16 = 7000;
/// The attacker's NIC: every forged source sits behind it, as behind a router.
const ATTACKER_MAC: EthernetAddress = EthernetAddress([2, 0xee, 0, 0, 0, 1]);

/// A pair A, B with an attacker on their link: a third tunnel peer of both (its socket bound
/// first).
struct Trio {
    a: Daemon,
    b: Daemon,
    attacker: UdpSocket,
    /// A's and B's tunnel addresses.
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

fn pair_with_attacker(extra: &str) -> Trio {
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ap = attacker.local_addr().unwrap().port();
    let (a, b, pa, pb) = with_free_udp_ports("a machnetd pair and an attacker", |pa, pb| {
        let a = Daemon::try_start_peers("a", IP_A, MAC_A, pa, &[pb, ap], extra)?;
        let b = Daemon::try_start_peers("b", IP_B, MAC_B, pb, &[pa, ap], extra)?;
        Ok((a, b, pa, pb))
    });
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    Trio { a, b, attacker, a_addr: at(pa), b_addr: at(pb) }
}

/// Sends forged SYNs to B:`PORT` from random 198.19.0.0/16 sources and ports, about `rate` a
/// second, until `stop`, counting them in `sent`.
fn flood(sock: UdpSocket, to: SocketAddr, rate: u64, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let caps = ChecksumCaps::software();
    let mut buf = [0u8; FRAME_HEADER_LEN];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let t0 = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let frame = FrameRepr {
            src_mac: ATTACKER_MAC,
            dst_mac: EthernetAddress::from_bytes(&[2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(198, 19, (x >> 8) as u8, x as u8),
            dst_ip: IP_B,
            src_port: 1024 + ((x >> 16) as u16 % 60_000),
            dst_port: PORT,
            hdr: MachnetRepr::control(PacketType::Syn, (x >> 32) as u32, 0),
        };
        let len = frame.emit(&mut buf, 0, caps).unwrap();
        if sock.send_to(&buf[..len], to).is_ok() {
            n += 1;
        }
        // Pace to `rate`: sleep whenever ahead of schedule.
        let due = Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(ahead);
        }
        sent.store(n, Ordering::Relaxed);
    }
}

fn shard0(d: &Daemon) -> serde_json::Value {
    ctl_json(&d.sock, "shards")["shards"][0].clone()
}

/// Thousands of forged SYNs a second at B's listener: every real connect from A succeeds in
/// well under 100 ms and its messages come back intact, B's half-open flows stay within their
/// budget, the flood's flows are evicted, and `machnetctl` names the flood and its sources.
#[test]
fn a_syn_flood_does_not_lock_out_real_clients() {
    let Trio { a, b, attacker, b_addr: b_port, .. } = pair_with_attacker("");
    let server = echo_server_on(&b, PORT, u64::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || flood(attacker, b_port, 20_000, stop, sent))
    };
    // Let the flood fill B's half-open budget (1024) many times over.
    let t = Instant::now();
    while sent.load(Ordering::Relaxed) < 5_000 {
        assert!(t.elapsed() < Duration::from_secs(20), "the flood could not send 5000 SYNs in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sh = shard0(&b);
    assert!(sh["endpoint"]["syn_evicted"].as_u64().unwrap() > 0, "no half-open flow evicted: {sh}");

    let m = a.app();
    let mut ch = m.attach().unwrap();
    let mut slowest = Duration::ZERO;
    for k in 0..20u64 {
        let t0 = Instant::now();
        let flow = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("connect {k} under a SYN flood: {e}"));
        slowest = slowest.max(t0.elapsed());
        ping_pong(&mut ch, flow, k, 2000, 50, 8);
        ch.close(flow).unwrap();
    }
    let sh = shard0(&b);
    let flows = ctl_json(&b.sock, "flows");
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    // Not locked out: no connect waits for its SYN to be retried past the flood (the SYN
    // timer backs off 5 ms, 10 ms, ... to 1 s); room for a loaded host's scheduling waits.
    assert!(slowest < Duration::from_millis(500), "the slowest of 20 connects took {slowest:?} ({sent} SYNs sent)");
    let half_open = sh["half_open"].as_u64().unwrap();
    assert!(half_open <= 1024, "{half_open} half-open flows: over the budget");
    assert!(sh["endpoint"]["syn_table_full"].as_u64() == Some(0), "the table filled: {sh}");
    // The flood's sources are listed (each one forged address, a few flows each).
    let sources = flows["half_open_sources"].as_array().unwrap();
    assert!(!sources.is_empty() && sources.len() <= 16, "half-open sources: {sources:?}");
    assert!(sources.iter().all(|s| s["ip"].as_str().unwrap().starts_with("198.19.")));
    // The text view shows the flood too.
    let text = String::from_utf8_lossy(&machnetctl(&b.sock, &["shards"]).stdout).into_owned();
    assert!(text.contains("half-open") && text.contains("syn evicted"), "{text}");
    drop(ch);
    drop(m);
    drop(server);
    let cookies = sh["endpoint"]["syn_cookies_accepted"].as_u64().unwrap();
    eprintln!(
        "20 connects under {sent} forged SYNs: slowest {slowest:?}; B: {half_open} half-open, {cookies} by cookie"
    );
}

/// One application takes every channel and flow it can: it is stopped at its limits
/// (`channel.max_per_app`, `transport.max_flows_per_app`, defaults all but a sixteenth) with a
/// clean "no resources", and another application still attaches, connects and transfers.
#[test]
fn one_application_cannot_take_every_flow_or_channel() {
    use machnet::client::Error;
    use machnet::ops::Status;
    let small =
        r#", "transport": {"max_flows": 64}, "channel": {"max_channels": 8, "buffers": 512, "ring_entries": 256}"#;
    let (a, b) = Daemon::pair_with(small, "");
    let server = echo_server_on(&b, PORT, u64::MAX);

    let greedy = a.app();
    let mut channels = Vec::new();
    let refused = loop {
        match greedy.attach() {
            Ok(ch) => channels.push(ch),
            Err(e) => break e,
        }
        assert!(channels.len() <= 8, "more channels than the daemon serves");
    };
    assert_eq!(channels.len(), 7, "8 channels, all but one for one application");
    assert!(matches!(refused, Error::Daemon(Status::NoResources)), "attach refused with {refused:?}");
    let ch = &mut channels[0];
    let mut flows = 0;
    let refused = loop {
        match ch.connect(IP_A, IP_B, PORT) {
            Ok(_) => flows += 1,
            Err(e) => break e,
        }
        assert!(flows <= 64, "more flows than the shard holds");
    };
    assert_eq!(flows, 60, "64 flows, all but four for one application");
    assert!(matches!(refused, Error::Daemon(Status::NoResources)), "connect refused with {refused:?}");

    // Someone else.
    let polite = a.app();
    let mut ch = polite.attach().expect("a second application attaches");
    for k in 0..4 {
        let flow = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("second application's connect {k}: {e}"));
        ping_pong(&mut ch, flow, k, 3000, 100, 8);
    }
    assert!(a.wait_log("channel refused, it has 7", Duration::from_secs(5)), "the refusal is logged");
    drop(channels);
    drop(greedy);
    drop(server);
}

/// The MAC `d`'s ARP table has for `ip`, as `machnetctl arp` shows it.
fn arp_entry(d: &Daemon, ip: Ipv4Addr) -> Option<String> {
    let doc = ctl_json(&d.sock, "arp");
    doc["arp"].as_array()?.iter().find(|e| e["ip"] == ip.to_string()).map(|e| e["mac"].as_str().unwrap().to_owned())
}

/// Sends ARP lies about B to A every millisecond until `stop`: unsolicited replies, gratuitous
/// ARP (request and reply), and requests whose sender fields claim B's IP. Counts them.
fn arp_liar(sock: UdpSocket, to: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let evil = EthernetAddress([2, 0xee, 0, 0, 0, 0x66]);
    let mac_a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let bcast = EthernetAddress::BROADCAST;
    let lies = [
        // "B is at evil", to A.
        (
            mac_a,
            ArpRepr {
                operation: ArpOperation::Reply,
                source_hardware_addr: evil,
                source_protocol_addr: IP_B,
                target_hardware_addr: mac_a,
                target_protocol_addr: IP_A,
            },
        ),
        // Gratuitous: B announces itself at evil.
        (
            bcast,
            ArpRepr {
                operation: ArpOperation::Request,
                source_hardware_addr: evil,
                source_protocol_addr: IP_B,
                target_hardware_addr: EthernetAddress::ZERO,
                target_protocol_addr: IP_B,
            },
        ),
        (
            bcast,
            ArpRepr {
                operation: ArpOperation::Reply,
                source_hardware_addr: evil,
                source_protocol_addr: IP_B,
                target_hardware_addr: bcast,
                target_protocol_addr: IP_B,
            },
        ),
        // "Who has A? tell B (at evil)".
        (bcast, ArpRepr::request(evil, IP_B, IP_A)),
    ];
    let mut buf = [0u8; 64];
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        for (dst, lie) in &lies {
            let len = emit_arp(&mut buf, evil, *dst, lie).unwrap();
            if sock.send_to(&buf[..len], to).is_ok() {
                n += 1;
            }
        }
        sent.store(n, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Forged ARP replies, gratuitous ARP and forged requests claiming B's address, sent to A
/// before and after it resolves B: A resolves B correctly, keeps the right MAC, and its
/// connects succeed at once and transfer.
#[test]
fn forged_arp_does_not_cut_a_peer_off() {
    let Trio { a, b, attacker, a_addr, .. } = pair_with_attacker("");
    let server = echo_server_on(&b, PORT, u64::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let liar = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || arp_liar(attacker, a_addr, stop, sent))
    };
    let t = Instant::now();
    while sent.load(Ordering::Relaxed) < 200 {
        assert!(t.elapsed() < Duration::from_secs(20), "the liar could not send 200 frames in 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(arp_entry(&a, IP_B), None, "lies created an entry");
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let mut slowest = Duration::ZERO;
    for k in 0..10u64 {
        let t0 = Instant::now();
        let flow = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("connect {k} amid ARP lies: {e}"));
        slowest = slowest.max(t0.elapsed());
        ping_pong(&mut ch, flow, k, 2000, 20, 4);
        ch.close(flow).unwrap();
        assert_eq!(arp_entry(&a, IP_B).as_deref(), Some(MAC_B), "after connect {k}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    liar.join().unwrap();
    // No connect waited out an ARP retry cycle (ARP retries take 50 ms, 100 ms, ... to 1 s);
    // room for a loaded host's scheduling waits.
    assert!(slowest < Duration::from_millis(500), "the slowest connect took {slowest:?}");
    let c = &ctl_json(&a.sock, "shards")["shards"][0]["counters"];
    assert!(c["arp_ignored"].as_u64().unwrap() > 0, "no reply counted as ignored: {c}");
    assert_eq!(c["arp_changed"].as_u64(), Some(0), "{c}");
    assert!(c["arp_suspected"].as_u64().unwrap() >= 1, "the liar's MAC was not made a suspect: {c}");
    drop(ch);
    drop(m);
    drop(server);
}

/// B restarts with a new MAC on the same address. A's entry still names the old MAC, so its
/// SYNs go unanswered; the first timeout re-resolves B, the reply moves the entry, and the
/// connect follows it: A reaches the new B within a second.
#[test]
fn a_peer_restarted_with_a_new_mac_is_reachable_within_a_second() {
    const NEW_MAC: &str = "02:00:00:00:00:22";
    let (a, b, pa, pb) = with_free_udp_ports("a machnetd pair", |pa, pb| {
        let a = Daemon::try_start("a", IP_A, MAC_A, pa, pb, "")?;
        let b = Daemon::try_start("b", IP_B, MAC_B, pb, pa, "")?;
        Ok((a, b, pa, pb))
    });
    let server = echo_server_on(&b, PORT, u64::MAX);
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch, flow, 1, 1000, 10, 1);
    ch.close(flow).unwrap();
    assert_eq!(arp_entry(&a, IP_B).as_deref(), Some(MAC_B));
    drop(server);
    drop(b);
    // The same address and tunnel port, a new MAC.
    let b2 = Daemon::try_start("b2", IP_B, NEW_MAC, pb, pa, "").expect("restart B on its port");
    let server = echo_server_on(&b2, PORT, u64::MAX);
    let t0 = Instant::now();
    let flow = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("connect to the restarted B: {e}"));
    let took = t0.elapsed();
    ping_pong(&mut ch, flow, 2, 1000, 10, 1);
    assert!(took < Duration::from_secs(1), "reached the restarted peer after {took:?}");
    assert_eq!(arp_entry(&a, IP_B).as_deref(), Some(NEW_MAC));
    let c = &ctl_json(&a.sock, "shards")["shards"][0]["counters"];
    assert_eq!(c["arp_changed"].as_u64(), Some(1), "{c}");
    eprintln!("reached B at its new MAC after {took:?}");
    drop(ch);
    drop(m);
    drop(server);
}

/// A small deterministic generator (xorshift).
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// One hostile frame for B (or two: a forged SYN and what would complete it): random bytes;
    /// valid Machnet headers with random fields, from forged sources or from A's address on
    /// ports its real flow does not use (A's client port is the lowest free one), to B's
    /// listener or anywhere; the same cut short.
    fn frames(&mut self) -> Vec<Vec<u8>> {
        let caps = ChecksumCaps::software();
        let r = self.next();
        let src_ip =
            if r % 3 == 0 { IP_A } else { Ipv4Addr::new(198, 19, (self.next() >> 8) as u8, self.next() as u8) };
        let src_port = 40_000 + (self.next() % 20_000) as u16;
        let dst_port = if r % 2 == 0 { PORT } else { self.next() as u16 };
        let known = [PacketType::Data, PacketType::Syn, PacketType::Ack, PacketType::SynAck, PacketType::Rst];
        let n = self.next();
        let packet_type =
            if n % 4 != 0 { known[(n >> 8) as usize % known.len()] } else { PacketType::from((n >> 16) as u8) };
        let mut sack = SackBitmap::new();
        sack.0[(n >> 24) as usize % 4] = self.next();
        let hdr = MachnetRepr {
            packet_type,
            msg_flags: MsgFlags::from_bits_retain((n >> 32) as u8),
            seqno: self.next() as u32,
            ackno: self.next() as u32,
            sack,
            sack_count: self.next() as u16,
            timestamp: self.next(),
        };
        let frame = FrameRepr {
            src_mac: ATTACKER_MAC,
            dst_mac: EthernetAddress::from_bytes(&[2, 0, 0, 0, 0, 2]),
            src_ip,
            dst_ip: IP_B,
            src_port,
            dst_port,
            hdr,
        };
        let emit = |f: &FrameRepr, payload: &[u8]| {
            let mut buf = vec![0u8; FRAME_HEADER_LEN + payload.len()];
            let len = f.emit_with_payload(&mut buf, payload, caps).unwrap();
            buf.truncate(len);
            buf
        };
        let payload: Vec<u8> = (0..1 + (self.next() % 1500) as usize).map(|i| i as u8).collect();
        match r >> 60 {
            0 => vec![(0..(self.next() % 200) as usize).map(|_| self.next() as u8).collect()],
            1 | 2 => {
                let mut b = emit(&frame, &payload);
                b.truncate((self.next() as usize) % b.len());
                vec![b]
            }
            3 | 4 => {
                // A forged handshake's SYN, and DATA at its ISN + 1 (which proves nothing).
                let syn = FrameRepr {
                    dst_port: PORT,
                    hdr: MachnetRepr { timestamp: 1, ..MachnetRepr::control(PacketType::Syn, hdr.seqno, 0) },
                    ..frame
                };
                let data = FrameRepr {
                    hdr: MachnetRepr::data(hdr.seqno.wrapping_add(1), MsgFlags::FIRST | MsgFlags::LAST, 1),
                    ..syn
                };
                vec![emit(&syn, &[]), emit(&data, &payload[..payload.len().clamp(1, 100)])]
            }
            _ => vec![emit(&frame, &payload[..payload.len() * usize::from(packet_type == PacketType::Data)])],
        }
    }
}

/// Generated garbage at B (random bytes, random Machnet headers and types, truncations,
/// forged handshakes) while A transfers to B's echo server: every echo comes back intact, and
/// once the garbage stops and B's handshake timeouts pass (1 s of silence here), B's shard
/// holds the real flow only, with no half-open flow.
#[test]
fn garbage_at_the_door_leaves_the_real_flow_and_nothing_behind() {
    let Trio { a, b, attacker, b_addr, .. } =
        pair_with_attacker(r#", "transport": {"peer_timeout_ms": 1000, "syn_retries": 4}"#);
    let server = echo_server_on(&b, PORT, u64::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let spewer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut g = Garbage(0x1234_5678_9abc_def1);
            let t0 = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for f in g.frames() {
                    if attacker.send_to(&f, b_addr).is_ok() {
                        n += 1;
                    }
                }
                // About 20,000 frames a second.
                if let Some(ahead) = Duration::from_micros(n * 50).checked_sub(t0.elapsed()) {
                    std::thread::sleep(ahead);
                }
                sent.store(n, Ordering::Relaxed);
            }
        })
    };
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, PORT).expect("connect amid garbage");
    // Messages of every size class, for two seconds of garbage at least.
    let t0 = Instant::now();
    let mut stream = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        for size in [1usize, 100, 1418, 1419, 5000, 20_000, 64_000] {
            ping_pong(&mut ch, flow, stream, size, 50, 8);
            stream += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    spewer.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    let during = shard0(&b);
    // The forged half-open flows time out (4 SYN-ACKs and 1 s of silence).
    let t = Instant::now();
    let sh = loop {
        let sh = shard0(&b);
        if sh["half_open"].as_u64() == Some(0) && sh["flows"].as_u64() == Some(1) {
            break sh;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "B keeps flows of the garbage: {sh}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let e = &sh["endpoint"];
    assert_eq!(e["flows_failed"].as_u64(), Some(0), "{e}");
    assert_eq!(e["rx_rsts"].as_u64(), Some(0), "a forged RST was accepted: {e}");
    assert!(e["rx_unproven_data"].as_u64().unwrap() > 0, "no forged handshake's DATA arrived: {e}");
    // The real flow still carries messages.
    ping_pong(&mut ch, flow, 99, 3000, 50, 8);
    eprintln!(
        "{sent} garbage frames; B during: {} flows, {} half-open; after {:?}: {e}",
        during["flows"],
        during["half_open"],
        t.elapsed()
    );
    drop(ch);
    drop(m);
    drop(server);
}
