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
