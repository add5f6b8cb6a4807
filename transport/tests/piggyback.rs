//! Acknowledgements carried in DATA (between machnet-rs peers that both offer them): an RPC
//! costs two frames instead of four, and loss, reordering, duplication and one-way streams
//! behave as with pure ACKs.

mod sim;

use machnet_net::wire::{FrameRepr, PacketType};
use machnet_transport::{Config, Endpoint, FlowId, LocalAddr, LocalPorts};
use sim::*;
use std::time::Duration;

/// `n` request/response exchanges of `size` bytes, one at a time (window 1), as an RPC
/// client and an echo server do. Returns the frames both sides sent for them.
#[track_caller]
fn rpcs(sim: &mut Sim, fa: FlowId, fb: FlowId, n: u64, size: usize) -> u64 {
    let frames = |s: &Sim| s.sides[A].env.frames_sent + s.sides[B].env.frames_sent;
    let before = frames(sim);
    let (ka, kb) = (sim.delivered(A, fa), sim.delivered(B, fb));
    for k in 0..n {
        sim.send(A, fa, fb, 1, kb + k, size).unwrap();
        assert!(
            sim.run_until(Duration::from_secs(5), |s| s.delivered(B, fb) == kb + k + 1),
            "request {k} not delivered"
        );
        sim.send(B, fb, fa, 2, ka + k, size).unwrap();
        assert!(
            sim.run_until(Duration::from_secs(5), |s| s.delivered(A, fa) == ka + k + 1),
            "response {k} not delivered"
        );
    }
    // The last response's ACK (which no request carries) goes out after its delay.
    sim.run_for(Duration::from_millis(1));
    frames(sim) - before
}

fn idle_and_clean(sim: &mut Sim) {
    assert!(sim.run_until(Duration::from_secs(5), |s| s.sides.iter().all(|x| x.env.segs.in_use() == 0)));
    for s in &sim.sides {
        assert!(s.ep.flows().all(|f| f.in_flight == 0 && f.queued == 0), "everything acknowledged");
    }
}

#[test]
fn an_rpc_takes_two_frames_not_four() {
    let n = 1000;
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    let with = rpcs(&mut sim, fa, fb, n, 64);
    idle_and_clean(&mut sim);
    let st = (sim.sides[A].ep.stats(), sim.sides[B].ep.stats());
    eprintln!(
        "acks in data: {} + {}, pure acks {} + {}",
        st.0.tx_acks_in_data, st.1.tx_acks_in_data, st.0.tx_acks, st.1.tx_acks
    );
    // One request and one response per RPC, and the last response's pure ACK (a couple more
    // where the simulated application's answer and the delay's deadline fall on one instant).
    assert!(with <= 2 * n + 4, "{with} frames for {n} RPCs with ACKs in DATA");
    assert_eq!(st.0.tx_retransmits + st.1.tx_retransmits, 0);

    let off = Config { piggyback_acks: false, ..Config::default() };
    let mut sim = Sim::new(SimConfig::link(off));
    let (fa, fb) = sim.connect(888);
    let without = rpcs(&mut sim, fa, fb, n, 64);
    assert_eq!(without, 4 * n, "frames for {n} RPCs with pure ACKs");
}

#[test]
fn the_delay_is_bounded_and_a_lone_message_is_acknowledged() {
    // A message nobody answers: the receiver's ACK waits `ack_delay` for DATA, then goes
    // alone; the sender's flow is idle one round trip plus the delay later.
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    let t0 = sim.now;
    sim.send(A, fa, fb, 1, 0, 100).unwrap();
    assert!(sim.run_until(Duration::from_secs(1), |s| {
        let f = s.sides[A].ep.flow_info(fa).unwrap();
        f.in_flight == 0 && f.queued == 0
    }));
    let took = sim.now - t0;
    // 5 µs each way on the link, 5 µs of delay, plus serialization: well under the 1 ms RTO floor.
    assert!(took >= Duration::from_micros(15) && took < Duration::from_micros(30), "acknowledged after {took:?}");
    assert_eq!(sim.sides[B].ep.stats().acks_delayed, 1);
    assert_eq!(sim.sides[B].ep.stats().tx_acks, 1);
    assert_eq!(sim.sides[A].ep.stats().tx_retransmits, 0);
}

#[test]
fn a_one_way_stream_still_gets_pure_acks() {
    // No reverse DATA at all: the receiver's ACKs are pure, a few per window, and the stream
    // runs at the link's rate without timeouts.
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    let t0 = sim.now;
    let n = 200u64;
    for k in 0..n {
        sim.send(A, fa, fb, 1, k, 64 << 10).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(5), |s| s.delivered(B, fb) == n));
    let took = sim.now - t0;
    idle_and_clean(&mut sim);
    let (a, b) = (sim.sides[A].ep.stats(), sim.sides[B].ep.stats());
    eprintln!("{n} x 64 KiB in {took:?}: {} data, {} pure acks, {} delayed", a.tx_data, b.tx_acks, b.acks_delayed);
    assert!(b.tx_acks > 0 && b.tx_acks_in_data == 0);
    assert!(b.tx_acks * 4 <= a.tx_data, "ACKs are coalesced: {} for {} packets", b.tx_acks, a.tx_data);
    assert_eq!(a.rto_fired, 0);
    // 13 MB at 10 Gbit/s is 10.5 ms.
    assert!(took < Duration::from_millis(15), "{took:?}");
}

#[test]
fn lost_acks_in_data_are_recovered() {
    // Drop a third of the responses (DATA carrying the ACK of the request): the client's
    // request is then unacknowledged, the server's response lost; both come again and every
    // RPC completes in order.
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    let mut k = 0u64;
    sim.drop_from(B, move |f: &FrameRepr| {
        if f.hdr.packet_type != PacketType::Data {
            return false;
        }
        k += 1;
        k % 3 == 0
    });
    let n = 300;
    rpcs(&mut sim, fa, fb, n, 3000);
    idle_and_clean(&mut sim);
    assert!(sim.sides[B].env.filtered >= n / 3, "{} dropped", sim.sides[B].env.filtered);
    assert!(sim.sides[B].ep.stats().tx_retransmits > 0);
    assert!(sim.sides[A].ep.flows().all(|f| f.acks_in_data));
}

#[test]
fn rpcs_and_streams_survive_loss_reordering_and_duplication() {
    for (drop, reorder, dup) in [(0.02, 0.0, 0.0), (0.0, 0.1, 0.0), (0.0, 0.0, 0.05), (0.02, 0.1, 0.05)] {
        let cfg = SimConfig::link(Config::default()).faults(drop, reorder, dup, 0.0, Duration::from_micros(3));
        let mut sim = Sim::new(cfg);
        let (fa, fb) = sim.connect(888);
        rpcs(&mut sim, fa, fb, 200, 2000);
        // Both ways at once, with several messages in flight.
        for k in 0..50 {
            sim.send(A, fa, fb, 1, 200 + k, 5000).unwrap();
            sim.send(B, fb, fa, 2, 200 + k, 700).unwrap();
        }
        assert!(
            sim.run_until(Duration::from_secs(10), |s| s.delivered(B, fb) == 250 && s.delivered(A, fa) == 250),
            "faults {drop}/{reorder}/{dup}: delivered {} and {}",
            sim.delivered(B, fb),
            sim.delivered(A, fa)
        );
        idle_and_clean(&mut sim);
    }
}

#[test]
fn a_peer_that_does_not_offer_gets_pure_acks() {
    // B runs with ACKs in DATA off (as an earlier machnet-rs would): the handshake leaves
    // both ends on pure ACKs, four frames per RPC.
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let off = Config { piggyback_acks: false, seed: 99, ..Config::default() };
    sim.sides[B].ep = Endpoint::new(off, LocalAddr { mac: MAC_B, ip: IP_B }, LocalPorts::new()).unwrap();
    let (fa, fb) = sim.connect(888);
    assert!(!sim.sides[A].ep.flow_info(fa).unwrap().acks_in_data);
    assert!(!sim.sides[B].ep.flow_info(fb).unwrap().acks_in_data);
    assert_eq!(rpcs(&mut sim, fa, fb, 100, 64), 400);
    assert_eq!(sim.sides[A].ep.stats().tx_acks_in_data + sim.sides[B].ep.stats().tx_acks_in_data, 0);
}
