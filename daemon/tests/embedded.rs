//! Embedded mode: two stacks in this process over an in-memory port pair (one with a fault
//! injector), driven by the application's own calls: the client API's operations and errors,
//! every message size, recovery from loss, and no allocation per message.

use machnet::client::Error;
use machnet::layout::MachnetFlow;
use machnet::ops::Status;
use machnet_daemon::embedded::{Embedded, EmbeddedConfig};
use machnet_net::port::fault::{FaultConfig, Faulty};
use machnet_net::port::mem::{pair, MemConfig, MemPort};
use machnet_net::port::Port;
use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_net::wire::EthernetAddress;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MAC_A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MAC_B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

fn stacks<P: Port, Q: Port>(pa: P, pb: Q) -> (Embedded<P>, Embedded<Q>) {
    (Embedded::new(pa, EmbeddedConfig::new(IP_A)).unwrap(), Embedded::new(pb, EmbeddedConfig::new(IP_B)).unwrap())
}

/// Connects A to B's listener on `port`, both polled by this thread.
fn connect<P: Port, Q: Port>(a: &mut Embedded<P>, b: &mut Embedded<Q>, port: u16) -> Result<MachnetFlow, Error> {
    let token = a.start_connect(IP_A, IP_B, port)?;
    let t = Instant::now();
    loop {
        a.poll();
        b.poll();
        if let Some(r) = a.connect_result(token) {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "connect did not finish");
    }
}

/// B listens on 888, A connects, and the handshake's last packets settle on both sides.
fn settled_flow<P: Port, Q: Port>(a: &mut Embedded<P>, b: &mut Embedded<Q>) -> MachnetFlow {
    b.listen(IP_B, 888).unwrap();
    let flow = connect(a, b, 888).unwrap();
    for _ in 0..10 {
        a.poll();
        b.poll();
    }
    flow
}

fn pattern(k: u64, j: usize) -> u8 {
    (k.wrapping_mul(131) as usize + j * 7) as u8
}

/// A sends `n` messages of `size` with `window` outstanding; B echoes each; A checks them.
fn echo<P: Port, Q: Port>(
    a: &mut Embedded<P>,
    b: &mut Embedded<Q>,
    flow: MachnetFlow,
    size: usize,
    n: u64,
    window: u64,
) {
    let mut out = vec![0u8; size];
    let mut buf = vec![0u8; size + 1];
    let (mut sent, mut got) = (0u64, 0u64);
    let t = Instant::now();
    while got < n {
        while sent < n && sent - got < window {
            for (j, x) in out.iter_mut().enumerate() {
                *x = pattern(sent, j);
            }
            match a.send(flow, &out) {
                Ok(()) => sent += 1,
                Err(Error::NoBuffers) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        if let Some((len, from)) = b.recv(&mut buf).unwrap() {
            loop {
                match b.send(reverse(from), &buf[..len]) {
                    Ok(()) => break,
                    Err(Error::NoBuffers) => {
                        assert!(t.elapsed() < Duration::from_secs(120), "echo of {got}/{n} ({size} B): no buffers");
                        a.poll();
                        b.poll();
                    }
                    Err(e) => panic!("echo: {e}"),
                }
            }
        }
        if let Some((len, from)) = a.recv(&mut buf).unwrap() {
            assert_eq!(len, size);
            assert_eq!(reverse(from), flow, "the echo arrives on the flow it was sent on");
            for (j, x) in buf[..len].iter().enumerate() {
                assert_eq!(*x, pattern(got, j), "message {got} of {size} B, byte {j}: in order, intact");
            }
            got += 1;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "stuck at {got}/{n} of {size} B");
    }
}

#[test]
fn every_size_class_echoes_through_two_embedded_stacks() {
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let (mut a, mut b) = stacks(pa, pb);
    b.listen(IP_B, 888).unwrap();
    let flow = connect(&mut a, &mut b, 888).unwrap();
    assert_eq!((flow.src_ip, flow.dst_ip, flow.dst_port), (IP_A.to_bits(), IP_B.to_bits(), 888));
    for (size, n, window) in [(1, 2000, 32), (1024, 2000, 32), (65_536, 200, 8), (8 << 20, 3, 1)] {
        echo(&mut a, &mut b, flow, size, n, window);
    }
    // Nothing more arrives (exactly once).
    let mut buf = [0u8; 16];
    for _ in 0..100 {
        a.poll();
        assert!(b.recv(&mut buf).unwrap().is_none());
        assert!(a.recv(&mut buf).unwrap().is_none());
    }
    assert_eq!(b.stats().arp_replies, 1, "A resolved B by ARP, once");
}

#[test]
fn loss_reordering_and_duplication_are_recovered() {
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let faults = FaultConfig { seed: 9, drop: 0.05, reorder: 0.05, duplicate: 0.01, ..FaultConfig::default() };
    let (mut a, mut b) = stacks(Faulty::new(pa, faults), Faulty::new(pb, FaultConfig { seed: 10, ..faults }));
    b.listen(IP_B, 888).unwrap();
    let flow = connect(&mut a, &mut b, 888).unwrap();
    for (size, n, window) in [(100, 1000, 16), (20_000, 200, 8)] {
        echo(&mut a, &mut b, flow, size, n, window);
    }
    let f = a.port().fault_stats();
    assert!(f.dropped > 10 && f.duplicated > 0 && f.reordered > 10, "{f:?}");
    assert!(a.endpoint_stats().tx_retransmits > 0);
}

#[test]
fn operations_fail_clearly() {
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let (mut a, mut b) = stacks(pa, pb);
    b.listen(IP_B, 888).unwrap();
    assert_eq!(b.listen(IP_B, 888), Err(Error::Daemon(Status::AddrInUse)));
    assert_eq!(b.listen(IP_A, 889), Err(Error::Daemon(Status::AddrNotLocal)));
    assert_eq!(a.start_connect(IP_B, IP_B, 888).unwrap_err(), Error::Daemon(Status::AddrNotLocal));
    assert_eq!(a.start_connect(IP_A, Ipv4Addr::BROADCAST, 888).unwrap_err(), Error::InvalidAddress);
    // Nobody listens on 999: refused by the peer's RST, promptly.
    assert_eq!(connect(&mut a, &mut b, 999), Err(Error::Daemon(Status::Refused)));
    let flow = connect(&mut a, &mut b, 888).unwrap();
    assert_eq!(a.send(flow, &[]), Err(Error::InvalidLength));
    assert_eq!(a.send(flow, &vec![0u8; (8 << 20) + 1]), Err(Error::InvalidLength));
    let stranger = MachnetFlow { dst_port: 4242, ..flow };
    assert_eq!(a.send(stranger, b"x"), Err(Error::Daemon(Status::NoSuchFlow)));
    // A message larger than the buffer is discarded with its size.
    a.send(flow, &[7u8; 100]).unwrap();
    let mut small = [0u8; 10];
    let t = Instant::now();
    let r = loop {
        a.poll();
        match b.recv(&mut small) {
            Ok(None) => assert!(t.elapsed() < Duration::from_secs(5)),
            other => break other,
        }
    };
    assert_eq!(r, Err(Error::TooSmall { needed: 100 }));
    // Graceful close: what was queued arrives, then the flow is gone on both sides.
    a.send(flow, b"last").unwrap();
    a.close(flow).unwrap();
    let mut buf = [0u8; 16];
    let t = Instant::now();
    loop {
        a.poll();
        if let Some((n, _)) = b.recv(&mut buf).unwrap() {
            assert_eq!(&buf[..n], b"last");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    while a.flow_count() + b.flow_count() > 0 {
        a.poll();
        b.poll();
        assert!(t.elapsed() < Duration::from_secs(5), "flows did not close");
    }
    assert_eq!(a.send(flow, b"after"), Err(Error::Daemon(Status::NoSuchFlow)));
}

#[test]
fn steady_state_allocates_nothing() {
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let (mut a, mut b): (Embedded<MemPort>, Embedded<MemPort>) = stacks(pa, pb);
    b.listen(IP_B, 888).unwrap();
    let flow = connect(&mut a, &mut b, 888).unwrap();
    echo(&mut a, &mut b, flow, 1000, 2000, 8);
    // Positive control: the counter sees this thread.
    assert_eq!(count_allocs(|| std::hint::black_box(vec![1u8; 3])).0, 1);
    let mut out = [0x42u8; 1000];
    let mut buf = [0u8; 2048];
    let t = Instant::now();
    let limit = Duration::from_secs(120);
    let (allocs, ()) = count_allocs(|| {
        for k in 0..20_000u32 {
            out[..4].copy_from_slice(&k.to_le_bytes());
            a.send(flow, &out).unwrap();
            let (n, from) = loop {
                if let Some(m) = b.recv(&mut buf).unwrap() {
                    break m;
                }
                assert!(t.elapsed() < limit, "request {k} did not arrive");
            };
            b.send(reverse(from), &buf[..n]).unwrap();
            loop {
                if let Some((n, _)) = a.recv(&mut buf).unwrap() {
                    assert_eq!(&buf[..n], &out[..]);
                    break;
                }
                assert!(t.elapsed() < limit, "the echo of request {k} did not arrive");
            }
        }
    });
    assert_eq!(allocs, 0, "{allocs} allocations in 20000 embedded round trips");
}

/// Answers to a burst of requests leave every `send_batch` sends (the peer starts on them while
/// this side works through the rest), and with 0 only when nothing is left to receive.
#[test]
fn answers_to_a_burst_leave_every_send_batch_sends() {
    for batch in [3usize, 0] {
        let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
        let a = Embedded::new(pa, EmbeddedConfig::new(IP_A)).unwrap();
        let b = Embedded::new(pb, EmbeddedConfig { send_batch: batch, ..EmbeddedConfig::new(IP_B) }).unwrap();
        let (mut a, mut b) = (a, b);
        let flow = settled_flow(&mut a, &mut b);
        let mut buf = [0u8; 64];
        for k in 0..6u8 {
            a.send(flow, &[k; 64]).unwrap();
        }
        let t = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() {
            if let Some((n, f)) = b.recv(&mut buf).unwrap() {
                got.push((buf[0], n, f));
            }
            assert!(t.elapsed() < Duration::from_secs(10), "B received nothing");
        }
        // Whatever B sent while receiving (acknowledgements) is taken off A's link.
        a.poll();
        assert_eq!(a.port().pending_rx(), 0);
        let from = got[0].2;
        for k in 0..6u8 {
            if k > 0 {
                let (n, f) = b.recv(&mut buf).unwrap().expect("the rest of the burst waits in the inbox");
                assert_eq!((buf[0], n, f), (k, 64, from));
            }
            b.send(reverse(from), &[k; 64]).unwrap();
            let sent = usize::from(k) + 1;
            let expect_out = if batch == 0 { sent == 6 } else { sent >= batch };
            assert_eq!(a.port().pending_rx() > 0, expect_out, "send_batch {batch}: after {sent} answers");
        }
    }
}

/// Which of a [`Slow`] port's operations takes its `delay`.
#[derive(Clone, Copy)]
enum SlowAt {
    /// Every transmission while `slow` is set: a device, or a hypervisor, slow to take frames.
    Tx,
    /// The first `free` after `slow` is set (which clears it): a receive stage that takes that
    /// long to work through its burst.
    FirstFree,
    /// Every transmission while `slow` is set, and the device takes nothing: a full ring.
    TxRefused,
}

/// A port with one slow operation (see [`SlowAt`]).
struct Slow<P> {
    inner: P,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay: Duration,
    at: SlowAt,
}

impl<P: Port> Port for Slow<P> {
    type Buf = P::Buf;
    fn capabilities(&self) -> &machnet_net::port::Capabilities {
        self.inner.capabilities()
    }
    fn alloc(&mut self) -> Option<Self::Buf> {
        self.inner.alloc()
    }
    fn free(&mut self, buf: Self::Buf) {
        if matches!(self.at, SlowAt::FirstFree) && self.slow.swap(false, std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(self.delay);
        }
        self.inner.free(buf)
    }
    fn rx_burst(&mut self, out: &mut machnet_net::port::Burst<Self::Buf>) -> usize {
        self.inner.rx_burst(out)
    }
    fn tx_burst(&mut self, pkts: &mut machnet_net::port::Burst<Self::Buf>) -> usize {
        if matches!(self.at, SlowAt::Tx | SlowAt::TxRefused)
            && self.slow.load(std::sync::atomic::Ordering::Relaxed)
            && !pkts.is_empty()
        {
            std::thread::sleep(self.delay);
            if matches!(self.at, SlowAt::TxRefused) {
                return 0;
            }
        }
        self.inner.tx_burst(pkts)
    }
    fn stats(&self) -> machnet_net::port::PortStats {
        self.inner.stats()
    }
}

/// An acknowledgement that waited in the receive ring while the stack's turn began with a long
/// transmission is timed from when the stack read it, not from when the turn began: the round
/// trip it gives is at least that transmission's length. (Timed from the turn's start, the
/// samples came out short by the flush, down to 1 ns; the path's base RTT then read 1 ns and
/// Swift held a bulk flow at its delay floor: S6, 1 MiB messages.)
#[test]
fn frames_received_after_a_long_flush_are_timed_after_it() {
    ack_read_after_a_long_flush(SlowAt::Tx);
}

/// The same when the device took none of what the flush built (its ring full): the flush took
/// its time all the same.
#[test]
fn frames_received_after_a_long_flush_the_device_refused_are_timed_after_it() {
    ack_read_after_a_long_flush(SlowAt::TxRefused);
}

fn ack_read_after_a_long_flush(at: SlowAt) {
    const DELAY: Duration = Duration::from_millis(5);
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let pa = Slow { inner: pa, slow: slow.clone(), delay: DELAY, at };
    let (mut a, mut b) = stacks(pa, pb);
    let flow = settled_flow(&mut a, &mut b);
    let mut buf = [0u8; 64];
    a.send(flow, &[1; 64]).unwrap();
    let t = Instant::now();
    let from = loop {
        a.poll();
        if let Some((_, f)) = b.recv(&mut buf).unwrap() {
            break f;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "B never heard from A");
    };
    // A message from B waits unread in A's inbox, so A's sends wait for its next turn.
    b.send(reverse(from), &[2; 64]).unwrap();
    for _ in 0..10 {
        b.poll();
        a.poll();
    }
    // m1 leaves in A's turn, B acknowledges it.
    a.send(flow, &[3; 64]).unwrap();
    a.poll();
    let t = Instant::now();
    while a.port().inner.pending_rx() == 0 {
        b.poll();
        assert!(t.elapsed() < Duration::from_secs(10), "B never acknowledged m1");
    }
    let before = a.flows().next().expect("one flow").srtt;
    // m2 waits for A's turn; the turn's flush takes DELAY, and then A reads the ACK of m1.
    a.send(flow, &[4; 64]).unwrap();
    slow.store(true, std::sync::atomic::Ordering::Relaxed);
    a.poll();
    slow.store(false, std::sync::atomic::Ordering::Relaxed);
    let after = a.flows().next().expect("one flow").srtt;
    // The sample is at least DELAY; the smoothed RTT moves an eighth of the way to it.
    assert!(after >= DELAY / 8, "srtt {before:?} -> {after:?}: the ACK read after a {DELAY:?} flush timed short");
}

/// What a turn sends after a long receive stage (here: ACKs that open the window for the rest
/// of a large message) is stamped with when it leaves, not with the turn's start: stamped
/// early, each round trip it gives is long by the whole receive stage (the sender's smoothed
/// RTT then jumps by an eighth of it per sample).
#[test]
fn frames_sent_after_a_long_receive_stage_are_stamped_after_it() {
    const DELAY: Duration = Duration::from_millis(200);
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pa, pb) = pair(MemConfig::default(), MAC_A, MAC_B);
    let pa = Slow { inner: pa, slow: slow.clone(), delay: DELAY, at: SlowAt::FirstFree };
    let (mut a, mut b) = stacks(pa, pb);
    let flow = settled_flow(&mut a, &mut b);
    // More than a window: the first flight leaves in `send`, the rest as ACKs come back.
    let msg = vec![7u8; 256 << 10];
    a.send(flow, &msg).unwrap();
    let t = Instant::now();
    while a.port().inner.pending_rx() == 0 {
        b.poll();
        assert!(t.elapsed() < Duration::from_secs(10), "B never acknowledged the first flight");
    }
    let before = a.flows().next().expect("one flow").srtt;
    // A's next turn: the receive stage takes DELAY (its first free), then the ACKs it read let
    // more of the message go.
    slow.store(true, std::sync::atomic::Ordering::Relaxed);
    a.poll();
    assert!(!slow.load(std::sync::atomic::Ordering::Relaxed), "the slow receive stage ran");
    // The largest smoothed RTT while the rest of the message goes (the later, fast samples
    // would smooth a long one away again).
    let mut buf = vec![0u8; msg.len()];
    let mut after = before;
    let t = Instant::now();
    loop {
        b.poll();
        a.poll();
        after = after.max(a.flows().next().expect("one flow").srtt);
        if b.recv(&mut buf).unwrap().is_some() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the message never arrived");
    }
    // Stamped at the turn's start, a sample of those packets is at least DELAY (srtt then at
    // least DELAY / 8); stamped when they leave, it is the ring's round trip (microseconds; a
    // busy machine's scheduling gaps stay far below DELAY / 2).
    assert!(
        after < DELAY / 16,
        "srtt {before:?} -> {after:?}: packets sent after a {DELAY:?} receive stage were stamped before it"
    );
}
