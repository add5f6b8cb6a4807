//! Handshake and teardown corner cases.

mod sim;

use machnet_net::wire::{FrameRepr, PacketType};
use machnet_transport::{Config, ConnectError, Endpoint, Event, FlowId, FlowState, LocalPorts};
use sim::*;
use std::time::Duration;

/// Drops the first `n` frames of type `ty`.
fn drop_first(n: usize, ty: PacketType) -> impl FnMut(&FrameRepr) -> bool {
    let mut left = n;
    move |f| {
        if f.hdr.packet_type == ty && left > 0 {
            left -= 1;
            true
        } else {
            false
        }
    }
}

fn connected(s: &Sim) -> bool {
    s.event(A, |e| matches!(e, Event::Connected { .. })).is_some()
}

/// After a handshake, messages flow both ways.
#[track_caller]
fn exchange_some(sim: &mut Sim, fa: machnet_transport::FlowId, fb: machnet_transport::FlowId) {
    // Continue each stream's numbering after what was already delivered.
    let (kb, ka) = (sim.delivered(B, fb), sim.delivered(A, fa));
    for k in 0..5 {
        sim.send(A, fa, fb, 1, kb + k, 3000).unwrap();
        sim.send(B, fb, fa, 2, ka + k, 100).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(2), |s| s.delivered(B, fb) == kb + 5 && s.delivered(A, fa) == ka + 5));
}

fn accepted_flow(sim: &Sim) -> machnet_transport::FlowId {
    match sim.event(B, |e| matches!(e, Event::Accepted { .. })) {
        Some(Event::Accepted { flow, .. }) => flow,
        other => panic!("no Accepted event: {other:?}"),
    }
}

#[test]
fn lost_syn_is_retransmitted() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.drop_from(A, drop_first(2, PacketType::Syn));
    let t0 = sim.now;
    let fa = sim.start_connect(888, 5);
    assert!(sim.run_until(Duration::from_secs(1), connected));
    // Two lost SYNs: retries after 5 ms and 10 ms more (initial RTO, doubled).
    let took = sim.now - t0;
    assert!(took >= Duration::from_millis(15) && took < Duration::from_millis(16), "{took:?}");
    assert_eq!(sim.sides[A].env.filtered, 2);
    assert!(sim.run_until(Duration::from_secs(1), |s| s.event(B, |e| matches!(e, Event::Accepted { .. })).is_some()));
    let fb = accepted_flow(&sim);
    exchange_some(&mut sim, fa, fb);
}

#[test]
fn lost_synack_is_retransmitted_by_timer_and_duplicate_syn() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.drop_from(B, drop_first(3, PacketType::SynAck));
    let fa = sim.start_connect(888, 5);
    assert!(sim.run_until(Duration::from_secs(1), connected));
    assert_eq!(sim.sides[B].env.filtered, 3);
    assert!(sim.run_until(Duration::from_secs(1), |s| s.event(B, |e| matches!(e, Event::Accepted { .. })).is_some()));
    let fb = accepted_flow(&sim);
    // Exactly one server flow exists despite the repeated SYNs.
    assert_eq!(sim.sides[B].ep.flow_count(), 1);
    exchange_some(&mut sim, fa, fb);
}

fn lost_final_ack(cfg: Config) -> Sim {
    let mut sim = Sim::new(SimConfig::link(cfg));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    // The client's handshake ACK is its first ACK: drop it.
    sim.drop_from(A, drop_first(1, PacketType::Ack));
    let fa = sim.start_connect(888, 5);
    assert!(sim.run_until(Duration::from_secs(1), connected));
    let t0 = sim.now;
    let fb_state = sim.sides[B].ep.flows().next().unwrap().state;
    assert_eq!(fb_state, FlowState::SynReceived);
    let fb = sim.sides[B].ep.flows().next().unwrap().id;
    sim.send(A, fa, fb, 1, 0, 10).unwrap();
    assert!(sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 1));
    assert!(sim.now - t0 < Duration::from_micros(100), "first message took {:?}", sim.now - t0);
    assert!(sim.event(B, |e| matches!(e, Event::Accepted { .. })).is_some());
    exchange_some(&mut sim, fa, fb);
    let negotiated = sim.sides[B].ep.flow_info(fb).unwrap().acks_in_data;
    assert_eq!(negotiated, sim.sides[A].ep.flow_info(fa).unwrap().acks_in_data);
    sim
}

#[test]
fn lost_final_ack_does_not_wedge_the_server() {
    // The server is still in SYN_RECEIVED. The first DATA does not establish it (anyone who
    // forged the SYN could send it): it answers with its SYN-ACK again, the client's ACK of
    // that establishes it, and the DATA's tail probe is delivered, promptly.
    let sim = lost_final_ack(Config { piggyback_acks: false, ..Config::default() });
    assert_eq!(sim.sides[B].ep.stats().rx_unproven_data, 1);
    assert!(sim.sides[B].ep.flows().all(|f| !f.acks_in_data), "not negotiated");
}

#[test]
fn with_acks_in_data_the_first_data_establishes_the_server() {
    // DATA carrying the ACK of the server's ISN proves what the lost ACK would have: the
    // server is established by it and delivers it at once.
    let sim = lost_final_ack(Config::default());
    assert_eq!(sim.sides[B].ep.stats().rx_unproven_data, 0);
    assert!(sim.sides[B].ep.flows().all(|f| f.acks_in_data), "negotiated");
}

#[test]
fn duplicate_syn_yields_one_flow() {
    let mut cfg = SimConfig::link(Config::default());
    cfg.ab.duplicate = 1.0; // every frame A sends arrives twice
    let mut sim = Sim::new(cfg);
    let (fa, fb) = sim.connect(888);
    assert_eq!(sim.sides[B].ep.flow_count(), 1);
    exchange_some(&mut sim, fa, fb);
}

#[test]
fn syn_to_closed_port_is_refused_promptly() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let t0 = sim.now;
    sim.start_connect(999, 42);
    assert!(
        sim.run_until(Duration::from_secs(1), |s| s.event(A, |e| matches!(e, Event::ConnectFailed { .. })).is_some())
    );
    assert_eq!(sim.event(A, |_| true), Some(Event::ConnectFailed { token: 42, error: ConnectError::Refused }));
    assert!(sim.now - t0 < Duration::from_micros(50), "refusal took {:?}", sim.now - t0);
    assert_eq!(sim.sides[A].ep.flow_count(), 0);
    assert_eq!(sim.sides[B].ep.stats().syn_no_listener, 1);
}

#[test]
fn unanswered_connect_fails_after_bounded_retries() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.drop_from(A, |_| true);
    let t0 = sim.now;
    sim.start_connect(888, 3);
    assert!(
        sim.run_until(Duration::from_secs(10), |s| s.event(A, |e| matches!(e, Event::ConnectFailed { .. })).is_some())
    );
    assert_eq!(sim.event(A, |_| true), Some(Event::ConnectFailed { token: 3, error: ConnectError::Timeout }));
    // 9 SYNs at 0, 5, 15, 35, 75, 155, 315, 635, 1275 ms (doubling, capped at 1 s), failure
    // 1 s after the last.
    let took = sim.now - t0;
    assert!(took > Duration::from_millis(2200) && took < Duration::from_millis(2400), "{took:?}");
    assert_eq!(sim.sides[A].env.filtered, 9);
    assert_eq!(sim.sides[A].ep.flow_count(), 0);
}

#[test]
fn rst_mid_transfer_closes_the_peer() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    for k in 0..20 {
        sim.send(A, fa, fb, 1, k, 50_000).unwrap();
    }
    sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) >= 3);
    let now = sim.now;
    let side = &mut sim.sides[A];
    side.ep.abort(now, &mut side.env, fa).unwrap();
    assert_eq!(side.ep.flow_count(), 0);
    assert_eq!(side.env.segs.in_use(), 0, "abort returns every segment");
    assert!(sim.run_until(Duration::from_secs(1), |s| s.event(B, |e| matches!(e, Event::PeerClosed { .. })).is_some()));
    assert_eq!(sim.sides[B].ep.flow_count(), 0);
    sim.run_until(Duration::from_millis(10), |_| false);
    assert_eq!(sim.sides[B].env.segs.in_use(), 0);
}

/// Sends one message A -> B, delivered, then makes B silent (nothing it sends arrives).
fn silence_b_after_one_message(cfg: Config) -> (Sim, FlowId, FlowId) {
    let mut sim = Sim::new(SimConfig::link(cfg));
    let (fa, fb) = sim.connect(888);
    sim.send(A, fa, fb, 1, 0, 100).unwrap();
    assert!(sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 1));
    sim.drop_from(B, |_| true);
    (sim, fa, fb)
}

fn failed(s: &Sim, side: usize) -> bool {
    s.event(side, |e| matches!(e, Event::FlowFailed { .. })).is_some()
}

#[test]
fn silent_peer_fails_the_flow_after_the_peer_timeout() {
    let (mut sim, fa, fb) = silence_b_after_one_message(Config::default());
    let t0 = sim.now;
    sim.send(A, fa, fb, 1, 1, 100).unwrap();
    assert!(sim.run_until(Duration::from_secs(10), |s| failed(s, A)));
    let took = sim.now - t0;
    // Silent for `peer_timeout` (5 s), judged at a timeout (they come every `rto_max`, 100 ms).
    assert!(took >= Duration::from_secs(5) && took < Duration::from_millis(5_200), "{took:?}");
    assert_eq!(sim.sides[A].ep.flow_count(), 0);
    assert_eq!(sim.sides[A].env.segs.in_use(), 0);
    assert!(sim.sides[A].ep.stats().tx_rsts >= 1, "an RST tells the peer");
}

#[test]
fn max_rto_retries_still_fails_by_count_when_set() {
    let (mut sim, fa, fb) = silence_b_after_one_message(Config { max_rto_retries: Some(10), ..Config::default() });
    let t0 = sim.now;
    sim.send(A, fa, fb, 1, 1, 100).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |s| failed(s, A)));
    let took = sim.now - t0;
    // Tail probe, then 10 timeouts: 1+2+4+8+16+32+64+100+100+100+100 ms ≈ 0.53 s (+ probe).
    assert!(took > Duration::from_millis(400) && took < Duration::from_millis(700), "{took:?}");
}

/// A peer that is not scheduled for 4 s (longer than ten timeouts, shorter than the peer
/// timeout) is waited for: once it runs again everything arrives and no flow fails.
#[test]
fn a_peer_paused_for_seconds_is_waited_for() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    for k in 0..20 {
        sim.send(A, fa, fb, 1, k, 50_000).unwrap();
    }
    sim.run_until(Duration::from_micros(30), |_| false);
    sim.paused_until[B] = sim.now + Duration::from_secs(4);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.delivered(B, fb) == 20));
    assert!(!failed(&sim, A) && !failed(&sim, B));
    assert!(sim.sides[A].ep.stats().rto_fired > 10, "A waited through many timeouts");
}

/// A sender that was not scheduled itself for longer than the peer timeout finds the peer's
/// answers queued when it runs again: whichever it handles first, input or timers, the flow
/// lives.
#[test]
fn our_own_pause_longer_than_the_peer_timeout_does_not_fail_the_flow() {
    for timers_first in [false, true] {
        let mut sim = Sim::new(SimConfig::link(Config::default()));
        sim.timers_first = timers_first;
        let (fa, fb) = sim.connect(888);
        for k in 0..20 {
            sim.send(A, fa, fb, 1, k, 50_000).unwrap();
        }
        sim.run_until(Duration::from_micros(30), |_| false);
        sim.paused_until[A] = sim.now + Duration::from_secs(8);
        assert!(sim.run_until(Duration::from_secs(12), |s| s.delivered(B, fb) == 20), "timers first: {timers_first}");
        sim.run_until(Duration::from_millis(10), |_| false);
        assert!(!failed(&sim, A) && !failed(&sim, B), "timers first: {timers_first}");
        assert_eq!(sim.sides[A].env.segs.in_use(), 0, "everything acknowledged");
    }
}

/// A receiver that answers every probe but cannot take data (its application does not read
/// for 20 s, four times the peer timeout) keeps its flow.
#[test]
fn a_peer_that_answers_probes_is_never_failed() {
    let mut cfg = SimConfig::link(Config::default());
    cfg.inbox = 1;
    let mut sim = Sim::new(cfg);
    let (fa, fb) = sim.connect(888);
    sim.sides[B].next_read = sim.now + Duration::from_secs(20);
    for k in 0..40 {
        sim.send(A, fa, fb, 1, k, 30_000).unwrap();
    }
    sim.run_until(Duration::from_secs(19), |_| false);
    assert!(sim.delivered(B, fb) <= 1);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.delivered(B, fb) == 40));
    assert!(!failed(&sim, A) && !failed(&sim, B));
}

#[test]
fn graceful_close_drains_then_resets() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    for k in 0..10 {
        sim.send(A, fa, fb, 1, k, 20_000).unwrap();
    }
    let now = sim.now;
    let side = &mut sim.sides[A];
    side.ep.close(now, &mut side.env, fa).unwrap();
    // No new messages after close.
    assert_eq!(sim.send(A, fa, fb, 1, 10, 5), Err(machnet_transport::Error::NotEstablished));
    assert!(sim.run_until(Duration::from_secs(1), |s| s.event(B, |e| matches!(e, Event::PeerClosed { .. })).is_some()));
    assert_eq!(sim.delivered(B, fb), 10, "everything queued before close arrives first");
    assert!(matches!(sim.event(A, |_| true), Some(Event::Closed { .. })));
    assert_eq!(sim.sides[A].ep.flow_count(), 0);
    assert_eq!(sim.sides[B].ep.flow_count(), 0);
    for s in &sim.sides {
        assert_eq!(s.env.segs.in_use(), 0);
    }
}

#[test]
fn connect_and_close_many_reuses_ports_and_slots() {
    let mut sim = Sim::new(SimConfig::link(Config { max_flows: 8, ..Config::default() }));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    for round in 0..50u64 {
        let fa = sim.start_connect(888, round);
        assert!(
            sim.run_until(Duration::from_secs(1), |s| s.event(A, |e| matches!(e, Event::Connected { .. })).is_some())
        );
        let now = sim.now;
        let side = &mut sim.sides[A];
        side.ep.close(now, &mut side.env, fa).unwrap();
        assert!(sim
            .run_until(Duration::from_secs(1), |s| s.sides[B].ep.flow_count() == 0 && s.sides[A].ep.flow_count() == 0));
        for s in &mut sim.sides {
            s.env.events.clear();
        }
    }
    assert_eq!(sim.sides[A].ep.stats().flows_opened, 50);
}

#[test]
fn ports_are_taken_from_the_allocator_and_a_closed_listeners_port_stays_while_its_flows_live() {
    // Which shard owns a port is the allocator's business (machnetd's shared table has its
    // tests there); here each side has a plain `LocalPorts`.
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    assert!(sim.sides[B].ep.ports().is_used(888), "the listener took its port");
    let client_port = sim.sides[A].ep.flow_info(fa).unwrap().tuple.local_port;
    assert!(sim.sides[A].ep.ports().is_used(client_port), "the client flow took its source port");
    assert_eq!(sim.sides[A].ep.ports().in_use(), 1);
    sim.sides[B].ep.unlisten(OWNER, 888).unwrap();
    assert!(sim.sides[B].ep.ports().is_used(888), "the accepted flow still uses the port");
    assert_eq!(sim.sides[B].ep.ports().in_use(), 1);
    exchange_some(&mut sim, fa, fb);
    // The port is still this endpoint's: listening on it again works, and so does closing that.
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.sides[B].ep.unlisten(OWNER, 888).unwrap();
    assert!(sim.sides[B].ep.ports().is_used(888));
    let now = sim.now;
    let side = &mut sim.sides[A];
    side.ep.close(now, &mut side.env, fa).unwrap();
    assert!(
        sim.run_until(Duration::from_secs(1), |s| s.sides[B].ep.flow_count() == 0 && s.sides[A].ep.flow_count() == 0)
    );
    assert!(!sim.sides[B].ep.ports().is_used(888), "released with the last flow");
    assert_eq!(sim.sides[B].ep.ports().in_use(), 0);
    assert!(!sim.sides[A].ep.ports().is_used(client_port));
    assert_eq!(sim.sides[A].ep.ports().in_use(), 0);
}

#[test]
fn server_keeps_a_half_open_flow_longer_than_a_client_waits() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    // A's first 7 handshake ACKs are lost: the server sees nothing for longer than a client's
    // whole SYN budget (≈ 0.35 s) while A already uses the flow.
    sim.drop_from(A, drop_first(7, PacketType::Ack));
    let fa = sim.start_connect(888, 5);
    assert!(sim.run_until(Duration::from_secs(1), connected));
    assert!(
        sim.run_until(Duration::from_secs(3), |s| s.event(B, |e| matches!(e, Event::Accepted { .. })).is_some()),
        "the server gave up on a connection its client had: {:?}",
        sim.sides[B].ep.stats()
    );
    assert_eq!(sim.sides[B].ep.stats().accept_timeouts, 0);
    let fb = accepted_flow(&sim);
    exchange_some(&mut sim, fa, fb);
}

/// The receiver's flow is gone (its application died) and the RST it sent was lost: the
/// sender's next DATA packet is answered with an RST that acknowledges it, and the sender
/// closes within a round trip instead of waiting out its peer timeout.
#[test]
fn data_for_a_flow_the_peer_no_longer_has_is_answered_with_rst() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    sim.send(A, fa, fb, 1, 0, 100).unwrap();
    // Delivered and acknowledged (the ACK may wait for DATA a few µs): A has nothing to resend.
    assert!(sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 1
        && s.sides[A].ep.flow_info(fa).unwrap().in_flight == 0));
    // B's flow ends; its RST is lost.
    let mut first = true;
    sim.drop_from(B, move |f| std::mem::take(&mut first) && f.hdr.packet_type == PacketType::Rst);
    let now = sim.now;
    let b = &mut sim.sides[B];
    b.ep.abort(now, &mut b.env, fb).unwrap();
    sim.run_until(Duration::from_millis(1), |_| false);
    assert!(sim.event(A, |e| matches!(e, Event::PeerClosed { .. })).is_none(), "the first RST was lost");
    let t0 = sim.now;
    sim.send(A, fa, fb, 1, 1, 100).unwrap();
    assert!(sim.run_until(Duration::from_secs(1), |s| s.event(A, |e| matches!(e, Event::PeerClosed { .. })).is_some()));
    assert!(sim.now - t0 < Duration::from_millis(1), "closed within a round trip: {:?}", sim.now - t0);
    assert_eq!(sim.sides[A].ep.flow_count(), 0);
    assert_eq!(sim.sides[A].env.segs.in_use(), 0);
}

/// A's side restarts (a new endpoint, nothing remembered) and connects again from the same
/// port — the lowest free one, as before — while B still holds the old flow, idle or holding a
/// message its application has not read. B answers the new SYN with a challenge ACK, A resets
/// the stale flow with an RST, and A's next SYN connects.
#[test]
fn a_restarted_peer_connects_through_its_stale_flow() {
    for unread in [false, true] {
        let mut cfg = SimConfig::link(Config::default());
        cfg.inbox = 1;
        let mut sim = Sim::new(cfg);
        let (fa, fb) = sim.connect(888);
        if unread {
            // B's application stops reading: a complete message waits in the flow.
            sim.sides[B].next_read = sim.now + Duration::from_secs(100);
        }
        for k in 0..3 {
            sim.send(A, fa, fb, 1, k, 100).unwrap();
        }
        // Everything in flight arrives first: B's flow is established and idle.
        sim.run_until(Duration::from_millis(10), |_| false);
        let old_port = sim.sides[A].ep.flow_info(fa).unwrap().tuple.local_port;
        // A restarts: a fresh endpoint with a new seed (new ISNs).
        let fresh = Config { seed: 77, ..Config::default() };
        sim.sides[A].ep = Endpoint::new(fresh, sim.sides[A].ep.local(), LocalPorts::new()).expect("valid config");
        sim.sides[A].env.events.clear();
        let t0 = sim.now;
        let f2 = sim.start_connect(888, 5);
        assert_eq!(sim.sides[A].ep.flow_info(f2).unwrap().tuple.local_port, old_port, "the same ports");
        assert!(
            sim.run_until(Duration::from_secs(3), |s| s.event(A, |e| matches!(e, Event::Connected { .. })).is_some()),
            "unread {unread}: no connect"
        );
        let took = sim.now - t0;
        assert!(took < Duration::from_millis(50), "unread {unread}: connected after {took:?} (one SYN retransmission)");
        assert_eq!(sim.sides[B].ep.stats().syn_challenged, 1, "unread {unread}");
        if !unread {
            assert!(sim.event(B, |e| matches!(e, Event::PeerClosed { flow, .. } if *flow == fb)).is_some());
        }
    }
}

/// A receiver that is not scheduled for 30 ms (a busy host) makes the sender's timer fire with
/// nothing lost. F-RTO resends only the oldest packet, the late ACK (echoing an original
/// transmission) shows the timeout was spurious, and nothing more is resent: a few
/// retransmitted packets, not a window's worth per timeout.
#[test]
fn a_late_ack_costs_one_retransmission_not_a_window() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    for k in 0..40 {
        sim.send(A, fa, fb, 1, k, 50_000).unwrap();
    }
    sim.run_until(Duration::from_micros(200), |_| false);
    sim.paused_until[B] = sim.now + Duration::from_millis(30);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.delivered(B, fb) == 40));
    let st = sim.sides[A].ep.stats();
    eprintln!(
        "rto {} spurious {} retransmits {} probes {}",
        st.rto_fired, st.spurious_rto, st.tx_retransmits, st.tail_probes
    );
    assert!(st.rto_fired >= 1 && st.spurious_rto >= 1, "the pause made a timeout, found spurious: {st:?}");
    assert!(
        st.tx_retransmits <= st.rto_fired + st.tail_probes,
        "one packet per timeout or probe: {} retransmitted for {} timeouts and {} probes",
        st.tx_retransmits,
        st.rto_fired,
        st.tail_probes
    );
}
