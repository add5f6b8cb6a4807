//! DPDK ports in one process, on `net_ring` (a loopback: what a queue transmits it receives)
//! and `net_null` (which has RSS with a readable key and RETA): frame content, capabilities,
//! RSS read-back, zero allocation in steady state, shutdown order, and the errors users see
//! for a bad EAL argument, a bad device string and a link that never comes up.
#![cfg(feature = "dpdk")]

mod dpdk_common;

use dpdk_common::{assert_no_dpdk_leftovers, env, is_child, say, ChildProc, TempDir};
use machnet_net::port::dpdk::{
    memif_vdev, register_thread, unique_file_prefix, unregister_thread, DeviceConfig, DeviceSpec, DpdkDevice,
    DpdkError, Eal, EalArgs,
};
use machnet_net::port::{Burst, PacketBuf, Port, BURST};
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::wire::ChecksumCaps;
use std::time::Duration;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const T: Duration = Duration::from_secs(60);

fn fill(b: &mut impl PacketBuf, len: usize, tag: u32) {
    let s = b.storage_mut();
    s[..6].copy_from_slice(&[0xff; 6]);
    s[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    s[12..14].copy_from_slice(&[0x88, 0xb5]);
    s[14..18].copy_from_slice(&tag.to_be_bytes());
    for (i, x) in s[18..len].iter_mut().enumerate() {
        *x = (tag as usize * 31 + i) as u8;
    }
    b.set_len(len);
}

fn check(frame: &[u8], len: usize, tag: u32) {
    assert_eq!(frame.len(), len);
    assert_eq!(&frame[14..18], &tag.to_be_bytes());
    for (i, x) in frame[18..].iter().enumerate() {
        assert_eq!(*x, (tag as usize * 31 + i) as u8, "byte {i} of frame {tag}");
    }
}

/// Receives `want` frames from `port` (bounded retries).
fn recv<P: Port>(port: &mut P, want: usize) -> Vec<P::Buf> {
    let mut got = Vec::new();
    let mut burst = Burst::new();
    for _ in 0..1_000_000 {
        port.rx_burst(&mut burst);
        got.extend(burst.drain(..));
        if got.len() >= want {
            break;
        }
    }
    got
}

#[test]
fn ring_and_null_ports_in_one_process() {
    if is_child() {
        return;
    }
    let prefix = unique_file_prefix("mn-loop");
    let mut c = ChildProc::spawn("child_ring_and_null", &[("MN_PREFIX", prefix.clone())], None);
    c.expect("ok", T);
    c.wait_success(T);
    assert_no_dpdk_leftovers(&prefix);
}

#[test]
#[ignore = "child process of ring_and_null_ports_in_one_process"]
fn child_ring_and_null() {
    if !is_child() {
        return;
    }
    let prefix = env("MN_PREFIX");
    let ring = DeviceSpec::parse("net_ring0");
    let null = DeviceSpec::parse("net_null0");
    let eal = Eal::init(EalArgs::new(&prefix).device(&ring).device(&null).build()).expect("EAL init");
    assert_eq!(Eal::init(vec![]).unwrap_err(), DpdkError::EalAlreadyInitialised);

    // --- net_ring: two queue pairs, each a loopback -------------------------------------------
    let cfg = DeviceConfig { queues: 2, link_timeout: Some(Duration::from_secs(5)), ..DeviceConfig::default() };
    let mut dev = DpdkDevice::open(&eal, &ring, &cfg).expect("open net_ring0");
    assert_eq!(dev.driver(), "net_ring");
    let caps = dev.capabilities().clone();
    assert_eq!(caps.queues, 2);
    assert_eq!(caps.mtu, 1500);
    assert!(caps.rss.is_none(), "net_ring has no RSS");
    assert_eq!(caps.checksum, ChecksumCaps::software(), "no offloads: software checksums");
    assert!(dev.link().unwrap().up);
    let mut ports = dev.take_ports();
    assert_eq!(ports.len(), 2);
    assert!(dev.take_ports().is_empty());

    let sizes = [60usize, 64, 100, 128, 512, 1000, 1514];
    for (q, port) in ports.iter_mut().enumerate() {
        assert_eq!(port.queue() as usize, q);
        let mut burst = Burst::new();
        for (i, &len) in sizes.iter().enumerate() {
            let mut b = port.alloc().expect("alloc");
            assert_eq!(b.len(), 0);
            assert!(b.capacity() >= 2048);
            fill(&mut b, len, (q * 100 + i) as u32);
            burst.push(b);
        }
        assert_eq!(port.tx_burst(&mut burst), sizes.len());
        assert!(burst.is_empty());
        let got = recv(port, sizes.len());
        assert_eq!(got.len(), sizes.len(), "queue {q} got its frames back");
        for (i, b) in got.into_iter().enumerate() {
            check(b.frame(), sizes[i], (q * 100 + i) as u32);
            assert!(!b.rx_checksum_good());
            port.free(b);
        }
        let s = port.stats();
        assert_eq!((s.tx_packets, s.rx_packets, s.rx_dropped), (sizes.len() as u64, sizes.len() as u64, 0));
        assert_eq!(s.tx_bytes, sizes.iter().sum::<usize>() as u64);
    }

    // A full burst, then steady state: nothing allocates.
    let port = &mut ports[0];
    let round = |port: &mut machnet_net::port::dpdk::DpdkPort, tag: u32| {
        let mut burst = Burst::new();
        while !burst.is_full() {
            let mut b = port.alloc().expect("alloc");
            fill(&mut b, 64 + burst.len(), tag);
            burst.push(b);
        }
        let sent = port.tx_burst(&mut burst);
        for b in burst.drain(..) {
            port.free(b);
        }
        let mut rx = Burst::new();
        let mut got = 0;
        for _ in 0..1000 {
            got += port.rx_burst(&mut rx);
            for b in rx.drain(..) {
                port.free(b);
            }
            if got >= sent {
                break;
            }
        }
        (sent, got)
    };
    for i in 0..100 {
        assert_eq!(round(port, i), (BURST, BURST));
    }
    let (allocs, total) = count_allocs(|| {
        let mut total = 0;
        for i in 0..20_000 {
            total += round(port, i).1;
        }
        total
    });
    assert_eq!(total, 20_000 * BURST);
    assert_eq!(allocs, 0, "steady rx/tx on a DPDK port allocates nothing");

    // A buffer dropped instead of freed goes back to its pool.
    let before = port.stats().alloc_failures;
    for _ in 0..20_000 {
        drop(port.alloc().expect("dropped buffers return to the pool"));
    }
    assert_eq!(port.stats().alloc_failures, before);

    // A port moves to another thread, which may register with DPDK (an lcore id, so mempool
    // operations use a per-thread cache).
    let mut p1 = ports.pop().unwrap();
    let p1 = std::thread::spawn(move || {
        let lcore = register_thread().expect("register a thread");
        assert_ne!(lcore, u32::MAX);
        for i in 0..100 {
            assert_eq!(round(&mut p1, i), (BURST, BURST));
        }
        unregister_thread();
        p1
    })
    .join()
    .unwrap();
    ports.push(p1);

    // Shutdown order: the device refuses to stop while a port is alive.
    let held = ports.pop().unwrap();
    drop(ports);
    assert_eq!(dev.stop(), Err(DpdkError::PortsInUse { alive: 1 }));
    drop(held);
    dev.stop().expect("stop");
    dev.close().expect("close");

    // --- net_null: RSS key and RETA read back -------------------------------------------------
    let cfg2 = DeviceConfig { queues: 2, ..DeviceConfig::default() };
    let dev2 = DpdkDevice::open(&eal, &null, &cfg2).expect("open net_null0");
    let rss = dev2.capabilities().rss.clone().expect("net_null hashes IPv4/UDP and has a RETA");
    assert_eq!(rss.key.len(), 40);
    assert!(rss.key.iter().any(|&b| b != 0));
    assert_eq!(rss.reta.len(), 128);
    assert!(rss.reta.iter().enumerate().all(|(i, &q)| q as usize == i % 2), "RETA programmed round-robin");
    assert!(rss.build().is_some(), "usable for the RSS-- source port search");
    // The same device cannot be opened twice.
    assert!(matches!(DpdkDevice::open(&eal, &null, &cfg2), Err(DpdkError::BadConfig(_))));
    drop(dev2); // closes it (no port was taken)

    // One queue: no RSS. The device is hot-plugged (not in the EAL arguments).
    let null1 = DeviceSpec::parse("net_null1");
    let dev3 = DpdkDevice::open(&eal, &null1, &DeviceConfig::default()).expect("hot-plug net_null1");
    assert!(dev3.capabilities().rss.is_none());
    assert_eq!(dev3.capabilities().queues, 1);
    // More queues than the device has, a frame larger than an mbuf: clear errors.
    let too_many = DeviceConfig { queues: u16::MAX, ..DeviceConfig::default() };
    let null2 = DeviceSpec::parse("net_null2");
    let e = DpdkDevice::open(&eal, &null2, &too_many).unwrap_err();
    assert!(matches!(e, DpdkError::Unsupported { what: "queue pairs", .. }), "{e}");
    // Sender-side steering needs memif (a device that carries the sender's queue index).
    let steer = machnet_net::port::dpdk::PeerSteering { key: vec![1; 40], peer_queues: 2, peer_key: vec![2; 40] };
    let steered = DeviceConfig { queues: 2, peer_steering: Some(steer), ..DeviceConfig::default() };
    let e = DpdkDevice::open(&eal, &null2, &steered).unwrap_err();
    assert!(e.to_string().contains("net_memif"), "{e}");
    let big = DeviceConfig { mtu: 9000, ..DeviceConfig::default() };
    let e = DpdkDevice::open(&eal, &null2, &big).unwrap_err();
    assert!(e.to_string().contains("data room"), "{e}");
    dev3.close().expect("close");

    // A configured MAC (Machnet names the port by it) replaces the device's own.
    let want = machnet_net::wire::EthernetAddress([0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]);
    let null3 = DeviceSpec::parse("net_null3");
    let mut dev5 = DpdkDevice::open(&eal, &null3, &DeviceConfig { mac: Some(want), ..DeviceConfig::default() })
        .expect("open with a MAC");
    assert_eq!(dev5.capabilities().mac, want);
    let ports5 = dev5.take_ports();
    assert_eq!(ports5[0].capabilities().mac, want, "the ports build frames from it");
    drop(ports5);
    dev5.stop().expect("stop");
    dev5.close().expect("close");

    // Shutdown with a device open is refused; then it works.
    let dev4 = DpdkDevice::open(&eal, &null2, &DeviceConfig::default()).expect("reopen after failed opens");
    let eal2 = eal.clone();
    assert_eq!(eal2.shutdown(), Err(DpdkError::DevicesOpen));
    dev4.close().expect("close");
    eal.shutdown().expect("EAL shutdown");
    assert!(!Eal::is_live());
    assert_eq!(Eal::init(vec![]).unwrap_err(), DpdkError::EalAlreadyInitialised);
    say("ok");
}

/// Runs a child that is expected to fail like a tool would: exit code 1 and a clear message,
/// no panic.
fn expect_clean_failure(test: &str, envs: &[(&str, String)], needles: &[&str]) -> String {
    let mut c = ChildProc::spawn(test, envs, None);
    let st = c.wait(T);
    let err = c.stderr();
    assert_eq!(st.code(), Some(1), "{test}: exit status {st:?}\nstderr:\n{err}\nstdout:\n{}", c.stdout());
    assert!(!err.contains("panicked"), "{test} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{test}: stderr lacks `{n}`:\n{err}");
    }
    err
}

/// What a program does with an error: print it and exit 1.
fn exit_on_error(r: Result<(), DpdkError>) -> ! {
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}

#[test]
fn bad_eal_argument_is_a_clear_error() {
    if is_child() {
        return;
    }
    let prefix = unique_file_prefix("mn-badarg");
    expect_clean_failure(
        "child_bad_eal_argument",
        &[("MN_PREFIX", prefix.clone())],
        &["error: DPDK EAL initialisation failed: Invalid argument", "second: DPDK's EAL is already initialised"],
    );
    assert_no_dpdk_leftovers(&prefix);
}

#[test]
#[ignore = "child process of bad_eal_argument_is_a_clear_error"]
fn child_bad_eal_argument() {
    if !is_child() {
        return;
    }
    let args = EalArgs::new(&env("MN_PREFIX")).arg("--no-such-eal-option").build();
    let e = Eal::init(args).unwrap_err();
    let again = Eal::init(EalArgs::new(&env("MN_PREFIX")).build()).unwrap_err();
    eprintln!("second: {again}");
    exit_on_error(Err(e));
}

#[test]
fn bad_device_string_given_to_the_eal_is_a_clear_error() {
    if is_child() {
        return;
    }
    let prefix = unique_file_prefix("mn-badvdev");
    expect_clean_failure(
        "child_bad_vdev_in_eal_args",
        &[("MN_PREFIX", prefix.clone())],
        &["error: DPDK EAL initialisation failed"],
    );
    assert_no_dpdk_leftovers(&prefix);
}

#[test]
#[ignore = "child process of bad_device_string_given_to_the_eal_is_a_clear_error"]
fn child_bad_vdev_in_eal_args() {
    if !is_child() {
        return;
    }
    let spec = DeviceSpec::parse("net_nosuchdriver0,foo=bar");
    exit_on_error(Eal::init(EalArgs::new(&env("MN_PREFIX")).device(&spec).build()).map(drop));
}

#[test]
fn bad_device_string_at_open_is_a_clear_error() {
    if is_child() {
        return;
    }
    let prefix = unique_file_prefix("mn-baddev");
    expect_clean_failure(
        "child_bad_device_at_open",
        &[("MN_PREFIX", prefix.clone())],
        &["error: no DPDK port has this device name", "memif: no DPDK port has this device name and probing it failed"],
    );
    assert_no_dpdk_leftovers(&prefix);
}

#[test]
#[ignore = "child process of bad_device_string_at_open_is_a_clear_error"]
fn child_bad_device_at_open() {
    if !is_child() {
        return;
    }
    let eal = Eal::init(EalArgs::new(&env("MN_PREFIX")).build()).expect("EAL init");
    // A driver argument it refuses.
    let bad_arg = DeviceSpec::parse("net_memif0,role=banana");
    let e = DpdkDevice::open(&eal, &bad_arg, &DeviceConfig::default()).unwrap_err();
    eprintln!("memif: {e}");
    let e = DpdkDevice::open(&eal, &DeviceSpec::parse("net_nosuchdriver0"), &DeviceConfig::default()).unwrap_err();
    eal.shutdown().expect("EAL shutdown");
    exit_on_error(Err(e));
}

#[test]
fn missing_link_is_a_clear_error() {
    if is_child() {
        return;
    }
    let prefix = unique_file_prefix("mn-nolink");
    let dir = TempDir::new("nolink");
    let sock = dir.path().join("memif.sock");
    expect_clean_failure(
        "child_missing_link",
        &[("MN_PREFIX", prefix.clone()), ("MN_SOCKET", sock.display().to_string())],
        &["error: the link did not come up within"],
    );
    assert!(!sock.exists(), "the memif server removed its socket file on close");
    assert_no_dpdk_leftovers(&prefix);
}

#[test]
#[ignore = "child process of missing_link_is_a_clear_error"]
fn child_missing_link() {
    if !is_child() {
        return;
    }
    // A memif server nobody connects to.
    let sock = std::path::PathBuf::from(env("MN_SOCKET"));
    let spec = DeviceSpec::parse(&memif_vdev(0, true, &sock));
    let eal = Eal::init(EalArgs::new(&env("MN_PREFIX")).device(&spec).build()).expect("EAL init");
    let cfg = DeviceConfig { link_timeout: Some(Duration::from_millis(300)), ..DeviceConfig::default() };
    let e = DpdkDevice::open(&eal, &spec, &cfg).unwrap_err();
    assert!(matches!(e, DpdkError::LinkDown { .. }));
    eal.shutdown().expect("EAL shutdown");
    exit_on_error(Err(e));
}
