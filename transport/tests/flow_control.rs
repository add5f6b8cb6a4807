//! Back-pressure and sequence-number wrap-around.

mod sim;

use machnet_transport::{Config, Event, FlowId, RxAdmission};
use sim::*;
use std::time::Duration;

/// A slow reader slows the sender; nothing is lost, nothing fails, and the receiver never
/// holds more than its window.
#[test]
fn slow_reader_slows_the_sender_without_loss() {
    let mut cfg = SimConfig::link(Config::default());
    cfg.inbox = 2;
    let mut sim = Sim::new(cfg);
    sim.sides[B].read_every = Some(Duration::from_micros(200));
    let (fa, fb) = sim.connect(888);
    let n = 300u64;
    let mut sent = 0;
    let mut max_rx_held = 0;
    let start = sim.now;
    while sim.delivered(B, fb) < n {
        while sent < n && sim.sides[A].env.segs.tx_in_use < 20_000 {
            sim.send(A, fa, fb, 1, sent, 20_000).unwrap();
            sent += 1;
        }
        max_rx_held = max_rx_held.max(sim.sides[B].env.segs.rx_in_use);
        assert!(sim.step());
        assert!(sim.now - start < Duration::from_secs(30), "stalled at {}", sim.delivered(B, fb));
    }
    let took = sim.now - start;
    // The reader's pace (one message per 200 us) sets the rate.
    assert!(took >= Duration::from_micros(200 * (n - 3)), "{took:?}");
    assert!(took < Duration::from_micros(200 * n) * 2, "{took:?}");
    let (a, b) = (sim.sides[A].ep.stats(), sim.sides[B].ep.stats());
    assert!(sim.sides[A].env.events.is_empty() && sim.sides[B].env.events.is_empty(), "no flow failed");
    assert_eq!(b.rx_no_buffer, 0);
    assert!(b.deliver_blocked > 0, "the reader did push back");
    // Held = the inbox's messages + at most one pending message + one window of packets.
    let per_msg = 20_000usize.div_ceil(SEG_SIZE);
    assert!(max_rx_held <= 3 * per_msg + 256, "receiver held {max_rx_held} segments");
    // Window-limited stalls cost few retransmissions (probes), not a storm.
    assert!(a.tx_retransmits < n / 2, "{} retransmissions", a.tx_retransmits);
}

/// A reader that stops for two seconds keeps its flow: the sender probes, the receiver
/// answers, and everything is delivered once it reads again.
#[test]
fn stalled_reader_keeps_the_flow_alive() {
    let mut cfg = SimConfig::link(Config::default());
    cfg.inbox = 1;
    let mut sim = Sim::new(cfg);
    let (fa, fb) = sim.connect(888);
    sim.sides[B].next_read = sim.now + Duration::from_secs(2);
    for k in 0..40 {
        sim.send(A, fa, fb, 1, k, 30_000).unwrap();
    }
    sim.run_until(Duration::from_secs(1), |_| false);
    assert_eq!(sim.delivered(B, fb), 0);
    assert!(sim.run_until(Duration::from_secs(3), |s| s.delivered(B, fb) == 40));
    assert!(sim.event(A, |e| matches!(e, Event::FlowFailed { .. })).is_none());
    assert!(sim.event(B, |e| matches!(e, Event::FlowFailed { .. })).is_none());
    sim.run_until(Duration::from_millis(5), |_| false);
    assert_eq!(sim.sides[A].env.segs.in_use(), 0);
}

/// Receive-buffer exhaustion (the engine's pool) drops packets unacknowledged; retransmission
/// carries the transfer through once buffers free.
#[test]
fn receive_pool_exhaustion_recovers() {
    let mut cfg = SimConfig::link(Config::default());
    cfg.rx_segs = 64;
    let mut sim = Sim::new(cfg);
    sim.sides[B].read_every = Some(Duration::from_micros(50));
    let (fa, fb) = sim.connect(888);
    for k in 0..30 {
        sim.send(A, fa, fb, 1, k, 40_000).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(5), |s| s.delivered(B, fb) == 30));
    assert!(sim.sides[B].ep.stats().rx_no_buffer > 0, "the pool did run dry");
    assert!(sim.event(A, |e| matches!(e, Event::FlowFailed { .. })).is_none());
}

/// Inverts splitmix64's finaliser, so a test can choose the seed that yields a given ISN.
fn unmix(mut z: u64) -> u64 {
    fn inv(c: u64) -> u64 {
        let mut x = c;
        for _ in 0..6 {
            x = x.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(x)));
        }
        x
    }
    z ^= (z >> 31) ^ (z >> 62);
    z = z.wrapping_mul(inv(0x94d0_49bb_1331_11eb));
    z ^= (z >> 27) ^ (z >> 54);
    z = z.wrapping_mul(inv(0xbf58_476d_1ce4_e5b9));
    z ^= (z >> 30) ^ (z >> 60);
    z
}

/// The seed whose first ISN is `isn` (the endpoint draws ISNs as splitmix64 outputs).
fn seed_for_isn(isn: u32) -> u64 {
    unmix(u64::from(isn)).wrapping_sub(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn sequence_numbers_wrap_under_loss_and_reordering() {
    // Clients draw their ISNs from the seed (a server's ISN is a SYN cookie): A connects to
    // B with ISN 2^32 - 16 and B to A with 2^32 - 256, so each direction's sequence numbers
    // cross the wrap on one of the two flows.
    let mut cfg = SimConfig::link(Config::default()).faults(0.05, 0.05, 0.01, 0.0, Duration::from_micros(2));
    cfg.seeds = [seed_for_isn(0xFFFF_FFF0), seed_for_isn(0xFFFF_FF00)];
    let mut sim = Sim::new(cfg);
    // Record (not drop) the SYNs' sequence numbers to prove the ISNs are where we want.
    let isns = std::rc::Rc::new(std::cell::Cell::new([0u32; 2]));
    for side in [A, B] {
        let isns = isns.clone();
        sim.drop_from(side, move |f| {
            if f.hdr.packet_type == machnet_net::wire::PacketType::Syn {
                let mut v = isns.get();
                v[side] = f.hdr.seqno;
                isns.set(v);
            }
            false
        });
    }
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.sides[A].ep.listen(OWNER, 999).unwrap();
    let fa = sim.start_connect(888, 1);
    let now = sim.now;
    let b = &mut sim.sides[B];
    let gb = b.ep.connect(now, &mut b.env, OWNER, IP_A, MAC_A, 999, 2).unwrap();
    b.env.flush_tx();
    let accepted = |s: &Sim, side: usize, port: u16| {
        s.sides[side].env.events.iter().find_map(|(_, e)| match e {
            Event::Accepted { flow, tuple } if tuple.local_port == port => Some(*flow),
            _ => None,
        })
    };
    assert!(sim.run_until(Duration::from_secs(1), |s| accepted(s, B, 888).is_some() && accepted(s, A, 999).is_some()));
    let (fb, ga) = (accepted(&sim, B, 888).unwrap(), accepted(&sim, A, 999).unwrap());
    assert_eq!(isns.get(), [0xFFFF_FFF0, 0xFFFF_FF00]);
    // 400 packets from each client cross its wrap; answers go the other way.
    for k in 0..100 {
        sim.send(A, fa, fb, 1, k, 5000).unwrap();
        sim.send(B, gb, ga, 2, k, 5000).unwrap();
        sim.send(B, fb, fa, 3, k, 300).unwrap();
        sim.send(A, ga, gb, 4, k, 300).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(5), |s| [(B, fb), (A, ga), (A, fa), (B, gb)]
        .iter()
        .all(|&(side, f)| s.delivered(side, f) == 100)));
    sim.run_until(Duration::from_millis(5), |_| false);
    for (side, f) in [(A, fa), (B, gb)] {
        let info = sim.sides[side].ep.flow_info(f).unwrap();
        assert!(info.counters.tx_messages == 100 && info.in_flight == 0, "{info:?}");
    }
    assert_eq!(sim.sides[A].env.segs.tx_in_use, 0);
    assert_eq!(sim.sides[B].env.segs.tx_in_use, 0);
}

/// Four flows into one receive pool of 256 buffers, three messages of 100 packets each per
/// flow (together 400 buffers: no pool-sized share for everyone), under loss and reordering.
fn shared_pool(admission: bool) -> (Sim, Vec<(FlowId, FlowId)>) {
    let mut cfg = SimConfig::link(Config::default()).faults(0.01, 0.01, 0.0, 0.0, Duration::from_micros(2));
    cfg.rx_segs = 256;
    let mut sim = Sim::new(cfg);
    if admission {
        sim.sides[B].env.admission = Some(RxAdmission::new(256, SEG_SIZE, 100 * SEG_SIZE));
    }
    let flows: Vec<_> = (0..4).map(|i| sim.connect(888 + i)).collect();
    for k in 0..3 {
        for (i, &(fa, fb)) in flows.iter().enumerate() {
            sim.send(A, fa, fb, i as u64, k, 100 * SEG_SIZE).unwrap();
        }
    }
    (sim, flows)
}

#[test]
fn flows_sharing_a_receive_pool_all_complete_with_admission() {
    let (mut sim, flows) = shared_pool(true);
    let all = |s: &Sim| flows.iter().all(|&(_, fb)| s.delivered(B, fb) == 3);
    assert!(sim.run_until(Duration::from_secs(20), all), "not every message arrived");
    assert!(sim.event(A, |e| matches!(e, Event::FlowFailed { .. })).is_none());
    assert!(sim.sides[B].ep.stats().rx_no_buffer > 0, "the pool did run low");
    // The control: without admission the same transfer deadlocks (every flow holds part of a
    // message; the senders' probes are answered, so they wait rather than fail).
    let (mut sim, flows) = shared_pool(false);
    let all = |s: &Sim| flows.iter().all(|&(_, fb)| s.delivered(B, fb) == 3);
    assert!(!sim.run_until(Duration::from_secs(20), all), "expected the deadlock admission prevents");
}
