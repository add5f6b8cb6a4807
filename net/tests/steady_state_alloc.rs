//! A steady stream of receive and transmit on every backend allocates nothing after warm-up.

use machnet_net::port::fault::{FaultConfig, Faulty};
use machnet_net::port::mem::{pair, MemConfig};
use machnet_net::port::udp::{UdpConfig, UdpPeer, UdpPort};
use machnet_net::port::{Burst, PacketBuf, Port, BURST};
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::time::Instant;
use machnet_net::wire::EthernetAddress;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Sends `rounds` bursts from `a` to `b` and back, returning frames received by each side.
fn pump<A: Port, B: Port>(a: &mut A, b: &mut B, rounds: usize, mut tick: impl FnMut(&mut A, usize)) -> (usize, usize) {
    let (mut got_a, mut got_b) = (0, 0);
    let mut burst = Burst::new();
    let mut rx_a: Burst<A::Buf> = Burst::new();
    let mut rx_b: Burst<B::Buf> = Burst::new();
    for round in 0..rounds {
        tick(a, round);
        while !burst.is_full() {
            let Some(mut f) = a.alloc() else { break };
            f.storage_mut()[..64].fill(round as u8);
            f.set_len(64 + round % 1400);
            burst.push(f);
        }
        a.tx_burst(&mut burst);
        for f in burst.drain(..) {
            a.free(f);
        }
        // Let the kernel deliver (UDP); spin briefly.
        for _ in 0..100 {
            if b.rx_burst(&mut rx_b) > 0 {
                break;
            }
        }
        got_b += rx_b.len();
        let mut echo: Burst<B::Buf> = Burst::new();
        for f in rx_b.drain(..) {
            echo.push(f);
        }
        b.tx_burst(&mut echo);
        for f in echo.drain(..) {
            b.free(f);
        }
        for _ in 0..100 {
            if a.rx_burst(&mut rx_a) > 0 {
                break;
            }
        }
        got_a += rx_a.len();
        for f in rx_a.drain(..) {
            a.free(f);
        }
    }
    (got_a, got_b)
}

#[test]
fn mem_pair_steady_state_allocates_nothing() {
    let (mut a, mut b) = pair(MemConfig::default(), EthernetAddress::ZERO, EthernetAddress::ZERO);
    pump(&mut a, &mut b, 200, |_, _| {});
    let (allocs, (ga, gb)) = count_allocs(|| pump(&mut a, &mut b, 20_000, |_, _| {}));
    assert_eq!(gb, 20_000 * BURST);
    assert_eq!(ga, gb);
    assert_eq!(allocs, 0);
}

#[test]
fn faulty_mem_steady_state_allocates_nothing() {
    let (a, mut b) = pair(MemConfig::default(), EthernetAddress::ZERO, EthernetAddress::ZERO);
    let cfg = FaultConfig {
        drop: 0.05,
        duplicate: 0.02,
        corrupt: 0.01,
        reorder: 0.05,
        delay: Duration::from_micros(5),
        jitter: Duration::from_micros(3),
        rate_bps: Some(40_000_000_000), // above the ~18 Gbit/s offered
        ..FaultConfig::default()
    };
    let mut a = Faulty::new(a, cfg);
    let tick = |p: &mut Faulty<_>, round: usize| p.set_now(Instant::from_micros(round as u64 * 10));
    pump(&mut a, &mut b, 500, tick);
    let (allocs, (_, gb)) = count_allocs(|| pump(&mut a, &mut b, 20_000, tick));
    assert!(gb > 20_000 * BURST * 9 / 10, "most frames arrive: {gb}");
    assert_eq!(allocs, 0);
}

#[test]
fn udp_tunnel_steady_state_allocates_nothing() {
    let lo = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
    let mac_a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let mac_b = EthernetAddress([2, 0, 0, 0, 0, 2]);
    let mut a = UdpPort::new(&UdpConfig::new(lo(0), mac_a, vec![])).unwrap();
    let mut b = UdpPort::new(&UdpConfig::new(lo(0), mac_b, vec![])).unwrap();
    a.add_peer(UdpPeer { mac: Some(mac_b), ..UdpPeer::new(b.local_addr().unwrap()) }).unwrap();
    b.add_peer(UdpPeer { mac: Some(mac_a), ..UdpPeer::new(a.local_addr().unwrap()) }).unwrap();
    pump(&mut a, &mut b, 200, |_, _| {});
    let (allocs, (_, gb)) = count_allocs(|| pump(&mut a, &mut b, 5_000, |_, _| {}));
    assert!(gb > 0);
    assert_eq!(allocs, 0);
}

/// The multi-queue tunnel: the sender hashes every IPv4/UDP frame to the receiving device's
/// queue (its RSS key and table), the receiver polls both queues.
#[test]
fn udp_tunnel_with_rss_steady_state_allocates_nothing() {
    let lo = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
    let mac_a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let mac_b = EthernetAddress([2, 0, 0, 0, 0, 2]);
    let mut a = UdpPort::new(&UdpConfig::new(lo(0), mac_a, vec![])).unwrap();
    let mut b = (35_000..60_000)
        .step_by(89)
        .find_map(|base| UdpPort::open_queues(&UdpConfig::new(lo(base), mac_b, vec![]), 2).ok())
        .expect("two free consecutive loopback ports");
    let base = b[0].local_addr().unwrap();
    let key = b[0].capabilities().rss.clone().unwrap().key;
    a.add_peer(UdpPeer { mac: Some(mac_b), ..UdpPeer::with_queues(base, 2, &key) }).unwrap();
    for q in &mut b {
        q.add_peer(UdpPeer { mac: Some(mac_a), ..UdpPeer::new(a.local_addr().unwrap()) }).unwrap();
    }
    let round = |a: &mut UdpPort, b: &mut [UdpPort], r: usize| -> [usize; 2] {
        let mut burst = Burst::new();
        for i in 0..BURST {
            let Some(mut f) = a.alloc() else { break };
            let s = f.storage_mut();
            s[..64].fill(0);
            s[..6].copy_from_slice(&mac_b.0);
            s[12..14].copy_from_slice(&[0x08, 0x00]);
            s[14] = 0x45;
            s[23] = 17;
            s[26..34].copy_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
            s[34..36].copy_from_slice(&((1024 + r * BURST + i) as u16).to_be_bytes());
            s[36..38].copy_from_slice(&888u16.to_be_bytes());
            f.set_len(64);
            burst.push(f);
        }
        a.tx_burst(&mut burst);
        for f in burst.drain(..) {
            a.free(f);
        }
        let mut got = [0; 2];
        let mut rx = Burst::new();
        for (q, port) in b.iter_mut().enumerate() {
            got[q] += port.rx_burst(&mut rx);
            for f in rx.drain(..) {
                port.free(f);
            }
        }
        got
    };
    for r in 0..200 {
        round(&mut a, &mut b, r);
    }
    let (allocs, got) = count_allocs(|| {
        let mut got = [0; 2];
        for r in 0..5_000 {
            let g = round(&mut a, &mut b, r);
            got = [got[0] + g[0], got[1] + g[1]];
        }
        got
    });
    assert!(got[0] > 0 && got[1] > 0, "both queues receive: {got:?}");
    assert_eq!(allocs, 0);
}
