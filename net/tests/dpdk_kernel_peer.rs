//! A DPDK port talking to the Linux kernel, a real and independent peer stack, in network
//! namespaces the tests create (198.18.0.0/15 addresses; everything removed afterwards):
//!
//! * `net_af_packet` and `net_af_xdp` on one end of a veth pair, the kernel on the other end in
//!   a second namespace;
//! * `net_tap` (a kernel tap interface in one namespace), whose driver offers IPv4/UDP checksum
//!   offloads, so the offload paths (transmit flags with the pseudo-header sum, receive
//!   GOOD/BAD flags) are checked against a peer that verifies checksums.
//!
//! The DPDK process answers the kernel's ARP requests, ICMP echo requests (from a raw socket)
//! and UDP datagrams (from an ordinary kernel socket, which drops a bad checksum) with frames
//! built by `machnet_net::wire`. A datagram with a bad UDP checksum must get no answer and be
//! counted (by the device when it verifies checksums, by software otherwise).
//!
//! These tests need root and `ip`; with the `dpdk` feature on they fail, saying so, without.
#![cfg(feature = "dpdk")]

mod dpdk_common;

use dpdk_common::{
    assert_no_dpdk_leftovers, env, ip, ip_output, is_child, raw_socket, recv_raw, require_root_and_ip, say, send_raw,
    stdin_lines, ChildProc, Netns,
};
use machnet_net::port::dpdk::{
    af_packet_vdev, af_xdp_vdev, unique_file_prefix, DeviceConfig, DeviceSpec, DpdkDevice, Eal, EalArgs,
};
use machnet_net::port::{Burst, PacketBuf, Port};
use machnet_net::wire::{
    self, emit_arp, ArpOperation, ArpRepr, ChecksumCaps, EtherType, EthernetAddress, EthernetRepr, Frame, IcmpEchoKind,
    IcmpEchoRepr, IcmpPacket, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
const UDP_PORT: u16 = 7777;
const UDP_SIZES: [usize; 6] = [1, 18, 100, 500, 1000, 1472];
const PINGS: [usize; 4] = [0, 56, 56, 1000];

/// What the DPDK responder reported at exit.
#[derive(Debug, Default)]
struct Counts {
    arp: u64,
    icmp: u64,
    udp: u64,
    rx_good: u64,
    bad_hw: u64,
    bad_sw: u64,
}

fn parse_counts(s: &str) -> Counts {
    let mut c = Counts::default();
    for kv in s.split_whitespace() {
        let (k, v) = kv.split_once('=').expect("key=value");
        let v: u64 = v.parse().unwrap();
        match k {
            "arp" => c.arp = v,
            "icmp" => c.icmp = v,
            "udp" => c.udp = v,
            "rx_good" => c.rx_good = v,
            "bad_hw" => c.bad_hw = v,
            "bad_sw" => c.bad_sw = v,
            _ => {}
        }
    }
    c
}

/// The kernel in `kernel_ns` exchanges ARP, ICMP and UDP with the DPDK responder; returns the
/// responder's counts.
fn exchange(
    kernel_ns: &str,
    kernel_iface: &str,
    responder: &mut ChildProc,
    dpdk_ip: Ipv4Addr,
    kernel_ip: Ipv4Addr,
    mac: &str,
) -> Counts {
    let mut kernel = ChildProc::spawn(
        "child_kernel_side",
        &[
            ("MN_PEER", dpdk_ip.to_string()),
            ("MN_LOCAL", kernel_ip.to_string()),
            ("MN_IFACE", kernel_iface.to_string()),
        ],
        Some(kernel_ns),
    );
    kernel.expect("kernel-ok", T);
    kernel.wait_success(T);
    // The kernel learned the DPDK side's MAC from our ARP reply.
    let neigh = ip_output(&["-n", kernel_ns, "neigh", "show", &dpdk_ip.to_string()]);
    assert!(neigh.contains(mac), "kernel neighbour entry for {dpdk_ip} has MAC {mac}: {neigh:?}");
    responder.send("stop");
    let counts = parse_counts(&responder.expect("done", T));
    responder.wait_success(T);
    assert!(counts.arp >= 1, "answered the kernel's ARP: {counts:?}");
    assert_eq!(counts.icmp, PINGS.len() as u64, "{counts:?}");
    assert_eq!(counts.udp, UDP_SIZES.len() as u64, "{counts:?}");
    assert!(counts.bad_hw + counts.bad_sw >= 1, "the bad-checksum datagram was counted: {counts:?}");
    counts
}

/// A veth pair between a DPDK namespace and a kernel namespace; `vdev` builds the device
/// string from the DPDK-side interface name.
fn veth_scenario(tag: &str, subnet: u8, vdev: impl Fn(&str) -> String) -> Counts {
    require_root_and_ip();
    let ns = Netns::create(&[&format!("{tag}d"), &format!("{tag}k")]);
    let (dns, kns) = (ns.name(0).to_string(), ns.name(1).to_string());
    let pid = std::process::id();
    let (vd, vk) = (format!("mn{tag}d{pid}"), format!("mn{tag}k{pid}"));
    ip(&["-n", &dns, "link", "add", &vd, "type", "veth", "peer", "name", &vk, "netns", &kns]);
    let kernel_ip = Ipv4Addr::new(198, 18, subnet, 1);
    let dpdk_ip = Ipv4Addr::new(198, 18, subnet, 2);
    ip(&["-n", &kns, "addr", "add", &format!("{kernel_ip}/24"), "dev", &vk]);
    ip(&["-n", &kns, "link", "set", &vk, "up"]);
    ip(&["-n", &dns, "link", "set", &vd, "up"]);

    let prefix = unique_file_prefix(&format!("mn-{tag}"));
    let mut responder = ChildProc::spawn(
        "child_dpdk_responder",
        &[("MN_PREFIX", prefix.clone()), ("MN_VDEV", vdev(&vd)), ("MN_IP", dpdk_ip.to_string())],
        Some(&dns),
    );
    let mac = responder.expect("ready", T);
    let counts = exchange(&kns, &vk, &mut responder, dpdk_ip, kernel_ip, &mac);
    drop(ns);
    assert_no_dpdk_leftovers(&prefix);
    counts
}

#[test]
fn af_packet_on_veth_answers_the_kernel() {
    if is_child() {
        return;
    }
    let c = veth_scenario("ap", 10, |iface| af_packet_vdev(0, iface, 1));
    assert_eq!(c.bad_hw, 0, "af_packet verifies no checksum");
    assert!(c.bad_sw >= 1, "software caught the bad checksum: {c:?}");
}

#[test]
fn af_xdp_on_veth_answers_the_kernel() {
    if is_child() {
        return;
    }
    let c = veth_scenario("ax", 11, |iface| af_xdp_vdev(0, iface, 1));
    assert!(c.bad_sw >= 1, "software caught the bad checksum: {c:?}");
}

#[test]
fn tap_with_checksum_offload_answers_the_kernel() {
    if is_child() {
        return;
    }
    require_root_and_ip();
    let ns = Netns::create(&["tp"]);
    let nsn = ns.name(0).to_string();
    let iface = format!("mntp{}", std::process::id());
    let kernel_ip = Ipv4Addr::new(198, 18, 12, 1);
    let dpdk_ip = Ipv4Addr::new(198, 18, 12, 2);
    let prefix = unique_file_prefix("mn-tap");
    let mut responder = ChildProc::spawn(
        "child_dpdk_responder",
        &[
            ("MN_PREFIX", prefix.clone()),
            ("MN_VDEV", format!("net_tap0,iface={iface}")),
            ("MN_IP", dpdk_ip.to_string()),
            ("MN_EXPECT_OFFLOAD", "1".to_string()),
        ],
        Some(&nsn),
    );
    let mac = responder.expect("ready", T);
    // The driver created the kernel interface: give the kernel side its address.
    ip(&["-n", &nsn, "addr", "add", &format!("{kernel_ip}/24"), "dev", &iface]);
    ip(&["-n", &nsn, "link", "set", &iface, "up"]);
    let c = exchange(&nsn, &iface, &mut responder, dpdk_ip, kernel_ip, &mac);
    assert!(c.rx_good >= UDP_SIZES.len() as u64, "the device verified the UDP checksums: {c:?}");
    assert!(c.bad_hw >= 1, "the device flagged the bad checksum and the port dropped it: {c:?}");
    drop(ns);
    assert_no_dpdk_leftovers(&prefix);
}

// --- the DPDK side ------------------------------------------------------------------------------

#[test]
#[ignore = "child process of the kernel-peer tests"]
fn child_dpdk_responder() {
    if !is_child() {
        return;
    }
    let spec = DeviceSpec::parse(&env("MN_VDEV"));
    let my_ip: Ipv4Addr = env("MN_IP").parse().unwrap();
    let eal = Eal::init(EalArgs::new(&env("MN_PREFIX")).device(&spec).main_lcore(1).build()).expect("EAL init");
    let cfg = DeviceConfig { link_timeout: Some(Duration::from_secs(10)), ..DeviceConfig::default() };
    let mut dev = DpdkDevice::open(&eal, &spec, &cfg).expect("open device");
    let caps = dev.capabilities().clone();
    if std::env::var_os("MN_EXPECT_OFFLOAD").is_some() {
        assert!(!caps.checksum.udp.tx() && !caps.checksum.ipv4.tx(), "tap offloads checksums: {caps:?}");
    }
    let mac = caps.mac;
    let mut port = dev.take_ports().pop().unwrap();
    say(&format!("ready {mac}"));

    let stdin = stdin_lines();
    let mut c = Counts::default();
    let mut rx = Burst::new();
    let deadline = Instant::now() + T;
    let mut idle = 0u32;
    loop {
        if port.rx_burst(&mut rx) == 0 {
            idle += 1;
            if idle % 64 == 0 {
                match stdin.try_recv() {
                    Ok(l) if l == "stop" => break,
                    Err(TryRecvError::Disconnected) => break,
                    _ => {}
                }
                assert!(Instant::now() < deadline, "no stop from the parent");
            }
            std::thread::yield_now();
            continue;
        }
        let mut tx = Burst::new();
        for b in rx.drain(..) {
            let sw = if b.rx_checksum_good() {
                c.rx_good += 1;
                caps.checksum.without_rx()
            } else {
                caps.checksum
            };
            let mut out = port.alloc().expect("alloc");
            let len = match wire::classify(b.frame(), sw) {
                Ok(Frame::Arp { eth, arp })
                    if arp.operation == ArpOperation::Request && arp.target_protocol_addr == my_ip =>
                {
                    c.arp += 1;
                    let reply = ArpRepr::reply_to(&arp, mac);
                    let s = out.storage_mut();
                    s[..60].fill(0);
                    emit_arp(s, mac, eth.src_addr, &reply).unwrap();
                    60
                }
                Ok(Frame::Icmp(f)) if f.echo.kind == IcmpEchoKind::Request && f.ip.dst_addr == my_ip => {
                    c.icmp += 1;
                    f.emit_reply(out.storage_mut(), mac, caps.checksum).unwrap()
                }
                // Not ARP, ICMP echo or Machnet (a short or non-Machnet UDP payload): plain UDP?
                Err(e) if e != wire::Error::Checksum => {
                    match udp_echo(b.frame(), out.storage_mut(), mac, my_ip, sw, caps.checksum) {
                        Ok(Some(n)) => {
                            c.udp += 1;
                            n
                        }
                        Ok(None) => 0,
                        Err(_) => {
                            c.bad_sw += 1;
                            0
                        }
                    }
                }
                Err(_) => {
                    c.bad_sw += 1;
                    0
                }
                Ok(_) => 0,
            };
            port.free(b);
            if len == 0 {
                port.free(out);
                continue;
            }
            out.set_len(len);
            tx.push(out);
        }
        while !tx.is_empty() {
            port.tx_burst(&mut tx);
        }
    }
    c.bad_hw = port.dpdk_stats().rx_bad_checksum;
    drop(port);
    dev.stop().expect("stop");
    dev.close().expect("close");
    eal.shutdown().expect("EAL shutdown");
    say(&format!(
        "done arp={} icmp={} udp={} rx_good={} bad_hw={} bad_sw={}",
        c.arp, c.icmp, c.udp, c.rx_good, c.bad_hw, c.bad_sw
    ));
}

/// The echo of a UDP datagram to `my_ip:UDP_PORT`, verified per `rx` (`Err` on a bad
/// checksum) and written into `out` with checksums per `tx`; its length.
fn udp_echo(
    frame: &[u8],
    out: &mut [u8],
    mac: EthernetAddress,
    my_ip: Ipv4Addr,
    rx: ChecksumCaps,
    caps: ChecksumCaps,
) -> Result<Option<usize>, wire::Error> {
    let Some(r) = (|| {
        let eth = wire::EthernetFrame::new_checked(frame).ok()?;
        if eth.ethertype() != EtherType::Ipv4 {
            return None;
        }
        let ipp = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ipp.protocol() != IpProtocol::Udp || ipp.dst_addr() != my_ip {
            return None;
        }
        Some((eth, ipp))
    })() else {
        return Ok(None);
    };
    let (eth, ipp) = r;
    let ip = Ipv4Repr::parse(&ipp, rx)?;
    let udp = UdpPacket::new_checked(ipp.payload())?;
    let repr = UdpRepr::parse(&udp, ip.src_addr, ip.dst_addr, rx)?;
    if repr.dst_port != UDP_PORT {
        return Ok(None);
    }
    Ok(Some(emit_udp_echo(out, mac, eth.src_addr(), my_ip, ip.src_addr, repr.src_port, udp.payload(), caps)))
}

#[allow(clippy::too_many_arguments)]
fn emit_udp_echo(
    out: &mut [u8],
    mac: EthernetAddress,
    to_mac: EthernetAddress,
    my_ip: Ipv4Addr,
    to_ip: Ipv4Addr,
    to_port: u16,
    payload: &[u8],
    caps: ChecksumCaps,
) -> usize {
    let (eth_len, ip_len, udp_len) = (14, 20, 8);
    let total = eth_len + ip_len + udp_len + payload.len();
    out[..total.max(60)].fill(0);
    EthernetRepr { src_addr: mac, dst_addr: to_mac, ethertype: EtherType::Ipv4 }.emit(out).unwrap();
    Ipv4Repr {
        src_addr: my_ip,
        dst_addr: to_ip,
        protocol: IpProtocol::Udp,
        payload_len: udp_len + payload.len(),
        ttl: 64,
    }
    .emit(&mut out[eth_len..], caps)
    .unwrap();
    let l4 = &mut out[eth_len + ip_len..total];
    l4[udp_len..].copy_from_slice(payload);
    UdpRepr { src_port: UDP_PORT, dst_port: to_port }.emit(l4, my_ip, to_ip, payload.len(), caps).unwrap();
    total.max(60)
}

// --- the kernel side ----------------------------------------------------------------------------

const ETHTOOL_SRXCSUM: u32 = 0x15;
const ETHTOOL_STXCSUM: u32 = 0x17;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// `ethtool -K <iface> rx|tx <on|off>` through the legacy ioctl (no ethtool binary needed).
fn ethtool_set(iface: &str, cmd: u32, value: u32) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut ev = EthtoolValue { cmd, data: value };
    // SAFETY: all-zero is a valid `ifreq`.
    let mut ifr: libc::ifreq = unsafe { core::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut ev as *mut EthtoolValue).cast();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: `ifr` names the interface and points at `ev`, both live across the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    // A device without the feature (tap) refuses to change it: nothing to switch off.
    assert!(rc == 0 || err.raw_os_error() == Some(libc::EOPNOTSUPP), "ethtool {cmd:#x} on {iface}: {err}");
}

#[test]
#[ignore = "child process of the kernel-peer tests"]
fn child_kernel_side() {
    if !is_child() {
        return;
    }
    let peer: Ipv4Addr = env("MN_PEER").parse().unwrap();
    let local: Ipv4Addr = env("MN_LOCAL").parse().unwrap();
    let sw = ChecksumCaps::software();
    // Make the kernel compute every checksum it sends and verify every one it receives (a
    // veth otherwise passes partial checksums and marks received frames as verified).
    let iface = env("MN_IFACE");
    ethtool_set(&iface, ETHTOOL_STXCSUM, 0);
    ethtool_set(&iface, ETHTOOL_SRXCSUM, 0);

    // UDP through an ordinary kernel socket: the kernel resolves the peer by ARP and drops any
    // reply whose checksum is wrong.
    let sock = UdpSocket::bind(SocketAddrV4::new(local, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let to = SocketAddrV4::new(peer, UDP_PORT);
    let mut buf = [0u8; 2048];
    for (i, &len) in UDP_SIZES.iter().enumerate() {
        let msg: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
        let mut ok = false;
        // The first datagram waits for ARP; retry a few times.
        for _ in 0..10 {
            sock.send_to(&msg, to).unwrap();
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(from, std::net::SocketAddr::V4(to));
                assert_eq!(&buf[..n], &msg[..], "UDP echo of {len} bytes");
                ok = true;
                break;
            }
        }
        assert!(ok, "no UDP echo for {len} bytes");
    }

    // ICMP echo from a raw socket; replies verified (checksum included) in software.
    let fd = raw_socket(libc::IPPROTO_ICMP);
    let ident = std::process::id() as u16;
    for (seq, &len) in PINGS.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (seq + j) as u8).collect();
        let req = IcmpEchoRepr { kind: IcmpEchoKind::Request, ident, seq_no: seq as u16, data: &data };
        let mut pkt = vec![0u8; req.buffer_len()];
        req.emit(&mut pkt, sw).unwrap();
        send_raw(fd, peer, &pkt);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "no echo reply for ping {seq}");
            let Some(n) = recv_raw(fd, &mut buf) else { continue };
            let ipp = Ipv4Packet::new_checked(&buf[..n]).unwrap();
            let ip = Ipv4Repr::parse(&ipp, sw).expect("valid IPv4 header checksum");
            let icmp = IcmpPacket::new_checked(ipp.payload()).unwrap();
            let Ok(echo) = IcmpEchoRepr::parse(&icmp, sw) else { panic!("bad ICMP reply") };
            if echo.kind != IcmpEchoKind::Reply || echo.ident != ident || echo.seq_no != seq as u16 {
                continue; // our own request, or something else
            }
            assert_eq!(ip.src_addr, peer);
            assert_eq!(echo.data, &data[..]);
            break;
        }
    }
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };

    // A datagram with a wrong UDP checksum: no answer.
    let quiet = UdpSocket::bind(SocketAddrV4::new(local, 40000)).unwrap();
    quiet.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let fd = raw_socket(libc::IPPROTO_UDP);
    let payload = b"bad checksum";
    let mut dgram = vec![0u8; 8 + payload.len()];
    dgram[8..].copy_from_slice(payload);
    UdpRepr { src_port: 40000, dst_port: UDP_PORT }.emit(&mut dgram, local, peer, payload.len(), sw).unwrap();
    dgram[6] ^= 0x55;
    send_raw(fd, peer, &dgram);
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    assert!(quiet.recv_from(&mut buf).is_err(), "a datagram with a bad checksum was answered");
    say("kernel-ok");
}
