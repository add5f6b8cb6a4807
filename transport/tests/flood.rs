//! A hostile network: SYN floods from forged sources and one application opening flows without
//! end. Half-open flows have a budget (the oldest is evicted, never an established flow), one
//! source cannot take the whole budget, and one owner group cannot take every flow.

mod sim;

use machnet_net::wire::{
    ChecksumCaps, EthernetAddress, FrameRepr, MachnetRepr, MsgFlags, PacketType, FRAME_HEADER_LEN,
};
use machnet_transport::{Config, Endpoint, Error, Event, FlowId, FlowState, LocalPorts};
use sim::*;
use std::net::Ipv4Addr;
use std::time::Duration;

/// A SYN to B:`port` from a host that does not exist.
fn forged_syn(ip: Ipv4Addr, src_port: u16, port: u16, isn: u32) -> FrameRepr {
    let o = ip.octets();
    FrameRepr {
        src_mac: EthernetAddress([2, 0xee, o[0], o[1], o[2], o[3]]),
        dst_mac: MAC_B,
        src_ip: ip,
        dst_ip: IP_B,
        src_port,
        dst_port: port,
        hdr: MachnetRepr::control(PacketType::Syn, isn, 0),
    }
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A random source in 198.19.0.0/16 (never one of the simulation's hosts) and port.
    fn source(&mut self) -> (Ipv4Addr, u16) {
        let r = self.next();
        (Ipv4Addr::new(198, 19, (r >> 8) as u8, r as u8), 1024 + (r >> 16) as u16 % 60_000)
    }
}

/// Runs `sim` for `span`, injecting `per_10us` forged SYNs to B:`port` every 10 µs.
fn flood(sim: &mut Sim, rng: &mut Rng, port: u16, span: Duration, per_10us: usize) {
    let end = sim.now + span;
    while sim.now < end {
        for _ in 0..per_10us {
            let (ip, sport) = rng.source();
            let isn = rng.next() as u32;
            sim.inject(B, &forged_syn(ip, sport, port, isn));
        }
        sim.run_for(Duration::from_micros(10));
    }
}

/// The flow of B's first `Accepted` event.
fn accepted(sim: &Sim) -> FlowId {
    match sim.event(B, |e| matches!(e, Event::Accepted { .. })) {
        Some(Event::Accepted { flow, .. }) => flow,
        _ => panic!("B accepted nothing"),
    }
}

fn connected(sim: &Sim, token: u64) -> bool {
    sim.event(A, |e| matches!(e, Event::Connected { token: t, .. } if *t == token)).is_some()
}

/// A million forged SYNs a second: a real client still connects at its first SYN and its
/// messages arrive, B never holds more half-open flows than its budget, and the flood's flows
/// are evicted rather than left to fill the table.
#[test]
fn a_syn_flood_does_not_lock_out_real_clients() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa, fb) = sim.connect(888);
    let mut rng = Rng(0x1234_5678);
    flood(&mut sim, &mut rng, 888, Duration::from_millis(20), 10);
    let b = &sim.sides[B].ep;
    assert!(b.half_open_count() <= Config::default().max_half_open, "{} half-open", b.half_open_count());
    assert!(
        b.stats().syn_evicted > 10_000,
        "evicted {}: {:?} flows {}",
        b.stats().syn_evicted,
        b.stats(),
        b.flow_count()
    );

    // A new client, mid-flood.
    let t0 = sim.now;
    let f2 = sim.start_connect(888, 42);
    let end = t0 + Duration::from_millis(100);
    let accepted = |s: &Sim| {
        s.sides[B].env.events.iter().any(|(_, e)| matches!(e, Event::Accepted { tuple, .. } if tuple.remote_ip == IP_A))
    };
    while !(connected(&sim, 42) && accepted(&sim)) && sim.now < end {
        flood(&mut sim, &mut rng, 888, Duration::from_micros(10), 10);
    }
    assert!(connected(&sim, 42), "no connect within 100 ms of a SYN flood");
    let took = sim.now - t0;
    assert!(took < Duration::from_millis(1), "connected after {took:?}: not at the first SYN");
    assert_eq!(sim.sides[A].ep.stats().syn_retransmits, 0);

    // Both the old flow and the new one carry messages while the flood goes on.
    let f2b = sim.sides[B]
        .env
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Accepted { flow, tuple } if tuple.remote_ip == IP_A => Some(*flow),
            _ => None,
        })
        .expect("B accepted the real client");
    for k in 0..20 {
        sim.send(A, fa, fb, 1, k, 3000).unwrap();
        sim.send(A, f2, f2b, 2, k, 3000).unwrap();
        flood(&mut sim, &mut rng, 888, Duration::from_micros(100), 10);
    }
    let ok = sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 20 && s.delivered(B, f2b) == 20);
    assert!(ok, "delivered {} and {} of 20", sim.delivered(B, fb), sim.delivered(B, f2b));
    assert!(sim.sides[B].ep.half_open_count() <= Config::default().max_half_open);
}

/// One source sending SYNs from every port holds at most `max_half_open_per_source`
/// half-open flows; the rest of the budget stays for everyone else.
#[test]
fn one_source_cannot_take_the_half_open_budget() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    let attacker = Ipv4Addr::new(198, 19, 7, 7);
    for p in 0..1000u16 {
        sim.inject(B, &forged_syn(attacker, 2000 + p, 888, u32::from(p)));
    }
    let per_source = Config::default().max_half_open_per_source;
    let b = &sim.sides[B].ep;
    assert_eq!(b.half_open_count(), per_source);
    assert_eq!(b.stats().syn_source_limited, 1000 - per_source as u64);
    let sources: Vec<_> = b.half_open_sources().collect();
    assert_eq!(sources, vec![(attacker, per_source as u32)]);
    // Everybody else still gets in.
    sim.inject(B, &forged_syn(Ipv4Addr::new(198, 19, 8, 8), 5000, 888, 1));
    assert_eq!(sim.sides[B].ep.half_open_count(), per_source + 1);
    let _ = sim.start_connect(888, 5);
    assert!(sim.run_until(Duration::from_millis(10), |s| connected(s, 5)));
}

/// Established flows are never evicted, however many SYNs arrive: twenty flows survive a flood
/// of fifty thousand SYNs and all carry messages afterwards.
#[test]
fn established_flows_survive_a_flood() {
    let mut sim = Sim::new(SimConfig::link(Config::default()));
    let (fa0, fb0) = sim.connect(888);
    let mut pairs = vec![(fa0, fb0)];
    for t in 1..20u64 {
        let fa = sim.start_connect(888, t);
        let accepted = |s: &Sim| {
            s.sides[B].env.events.iter().filter(|(_, e)| matches!(e, Event::Accepted { .. })).count() == t as usize
        };
        assert!(sim.run_until(Duration::from_millis(10), |s| connected(s, t) && accepted(s)));
        let fb = sim.sides[B]
            .env
            .events
            .iter()
            .rev()
            .find_map(|(_, e)| match e {
                Event::Accepted { flow, .. } => Some(*flow),
                _ => None,
            })
            .unwrap();
        pairs.push((fa, fb));
    }
    let mut rng = Rng(99);
    flood(&mut sim, &mut rng, 888, Duration::from_millis(50), 10);
    for (k, &(fa, fb)) in pairs.iter().enumerate() {
        let info = sim.sides[B].ep.flow_info(fb).expect("established flow evicted");
        assert_eq!(info.state, FlowState::Established);
        sim.send(A, fa, fb, k as u64, 0, 5000).unwrap();
    }
    let ok = sim.run_until(Duration::from_secs(1), |s| pairs.iter().all(|&(_, fb)| s.delivered(B, fb) == 1));
    assert!(ok, "not every established flow delivered after the flood");
}

/// With the arena full of half-open flows (a budget as large as the arena), a real SYN and a
/// local connect each take the oldest half-open flow's slot.
#[test]
fn half_open_flows_yield_their_slots_to_real_connections() {
    let mut cfg = Config::default().with_max_flows(64);
    cfg.max_half_open = 64;
    cfg.max_half_open_per_source = 64;
    cfg.max_flows_per_group = 64;
    let mut sim = Sim::new(SimConfig::link(cfg));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.sides[A].ep.listen(OWNER, 999).unwrap();
    let mut rng = Rng(7);
    for _ in 0..64 {
        let (ip, p) = rng.source();
        sim.inject(B, &forged_syn(ip, p, 888, 1));
    }
    assert_eq!(sim.sides[B].ep.flow_count(), 64, "the arena is full");
    // A real client's SYN.
    let _ = sim.start_connect(888, 1);
    assert!(
        sim.run_until(Duration::from_millis(10), |s| connected(s, 1)),
        "A could not connect: {:?} {:?}",
        sim.sides[B].ep.stats(),
        sim.sides[A].ep.stats()
    );
    // B's own application connects out.
    let now = sim.now;
    let b = &mut sim.sides[B];
    let fb = b.ep.connect(now, &mut b.env, OWNER, IP_A, MAC_A, 999, 2).expect("connect with the arena full");
    b.env.flush_tx();
    assert!(sim.run_until(Duration::from_millis(10), |s| s
        .event(B, |e| matches!(e, Event::Connected { flow, .. } if *flow == fb))
        .is_some()));
    assert_eq!(sim.sides[B].ep.stats().syn_evicted, 2);
}

/// An owner group (the daemon: one application) holds at most `max_flows_per_group` flows;
/// its further connects fail with TooManyFlows and SYNs to its listeners are dropped, while
/// another group's listener still accepts.
#[test]
fn one_group_cannot_take_every_flow() {
    let mut cfg = Config::default().with_max_flows(64);
    cfg.max_flows_per_group = 4;
    let mut sim = Sim::new(SimConfig::link(cfg));
    // A, the client, has no group limit.
    let a_cfg = Config { seed: 3, ..Config::default().with_max_flows(64) };
    sim.sides[A].ep = Endpoint::new(a_cfg, sim.sides[A].ep.local(), LocalPorts::new()).unwrap();
    const OTHER: u32 = OWNER + 1;
    sim.sides[B].ep.set_owner_group(OWNER, 1);
    sim.sides[B].ep.set_owner_group(OTHER, 2);
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    sim.sides[B].ep.listen(OTHER, 889).unwrap();
    for t in 0..6u64 {
        let _ = sim.start_connect(888, t);
    }
    sim.run_until(Duration::from_millis(20), |_| false);
    let accepted =
        sim.sides[B].env.events.iter().filter(|(o, e)| *o == OWNER && matches!(e, Event::Accepted { .. })).count();
    assert_eq!(accepted, 4);
    assert!(sim.sides[B].ep.stats().group_limited >= 2);
    // B's group-1 owner cannot connect out either.
    let now = sim.now;
    let b = &mut sim.sides[B];
    assert_eq!(b.ep.connect(now, &mut b.env, OWNER, IP_A, MAC_A, 999, 9).err(), Some(Error::TooManyFlows));
    // The other group is unaffected.
    let a = &mut sim.sides[A];
    let _ = a.ep.connect(now, &mut a.env, OWNER, IP_B, MAC_B, 889, 100).unwrap();
    a.env.flush_tx();
    assert!(sim.run_until(Duration::from_millis(10), |s| connected(s, 100)));
}

/// A forged source's SYN followed by DATA at its ISN + 1 (what a lost final ACK's client sends,
/// and what anyone can send without seeing the SYN-ACK) opens no flow: the DATA is answered
/// with the SYN-ACK again, nothing is delivered, and the half-open flows stay within their
/// budget and go at their timeout. (DATA used to establish the flow, so a blind flood of such
/// pairs filled the table with established flows that never went away.)
#[test]
fn data_after_a_forged_syn_does_not_establish() {
    let mut sim = Sim::new(SimConfig::link(Config::default().with_max_flows(64)));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    let mut rng = Rng(5);
    for _ in 0..1000 {
        let (ip, sport) = rng.source();
        let isn = rng.next() as u32;
        let syn = FrameRepr {
            hdr: MachnetRepr { timestamp: 1, ..MachnetRepr::control(PacketType::Syn, isn, 0) },
            ..forged_syn(ip, sport, 888, isn)
        };
        sim.inject(B, &syn);
        let data =
            FrameRepr { hdr: MachnetRepr::data(isn.wrapping_add(1), MsgFlags::FIRST | MsgFlags::LAST, 1), ..syn };
        let mut buf = [0u8; FRAME_HEADER_LEN + 10];
        let n = data.emit_with_payload(&mut buf, &[7; 10], ChecksumCaps::software()).unwrap();
        assert!(sim.inject_bytes(B, &buf[..n]));
        sim.run_for(Duration::from_micros(10));
    }
    let b = &sim.sides[B];
    assert!(b.env.events.is_empty(), "{:?}", &b.env.events[..1]);
    assert!(b.env.inbox.is_empty());
    assert_eq!(b.ep.stats().rx_unproven_data, 1000);
    assert_eq!(b.ep.flow_count(), b.ep.half_open_count());
    assert!(b.ep.half_open_count() <= b.ep.config().max_half_open);
    sim.run_for(Duration::from_secs(30));
    assert_eq!(sim.sides[B].ep.flow_count(), 0);
    assert_eq!(sim.sides[B].env.segs.in_use(), 0);
    // A real client still connects.
    let _ = sim.start_connect(888, 3);
    assert!(sim.run_until(Duration::from_millis(10), |s| connected(s, 3)));
}

/// A client 5 ms from B (connect token 7 to B:888) whose frames `drop` drops, while B takes
/// 12 ms of a million forged SYNs a second (its half-open flow is evicted).
fn flooded_slow_client(drop: impl FnMut(&FrameRepr) -> bool + 'static) -> (Sim, FlowId) {
    let mut cfg = SimConfig::link(Config::default());
    cfg.ab.delay = Duration::from_millis(5);
    let mut sim = Sim::new(cfg);
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    let fa = sim.start_connect(888, 7);
    sim.drop_from(A, drop);
    let mut rng = Rng(0xc00c1e);
    flood(&mut sim, &mut rng, 888, Duration::from_millis(12), 10);
    (sim, fa)
}

/// A real client whose final ACK arrives after a budget's worth of forged SYNs (5 ms one way
/// from A to B, a million SYNs a second) finds its half-open flow evicted; the ACK's cookie
/// rebuilds it, B accepts, and messages go both ways. A forged ACK (a wrong cookie) is
/// answered with RST and opens nothing.
#[test]
fn a_client_whose_half_open_flow_was_evicted_is_accepted_by_its_cookie() {
    // Its SYN is on the way; retransmissions of it (A's handshake timer is shorter than the
    // 5 ms path) would open a fresh half-open flow just in time for the ACK.
    let (mut sim, fa) = flooded_slow_client(|f| f.hdr.packet_type == PacketType::Syn);
    let st = *sim.sides[B].ep.stats();
    assert!(st.syn_evicted > 5_000, "{st:?}");
    assert!(
        sim.run_until(Duration::from_millis(50), |s| connected(s, 7)
            && s.event(B, |e| matches!(e, Event::Accepted { .. })).is_some()),
        "A {:?} B {:?} {:?}",
        sim.sides[A].env.events,
        sim.sides[B].env.events,
        sim.sides[B].ep.stats()
    );
    assert_eq!(
        sim.sides[B].ep.stats().syn_cookies_accepted,
        1,
        "{:?} {:?}",
        sim.sides[B].ep.stats(),
        sim.sides[A].ep.stats()
    );
    let fb = accepted(&sim);
    for k in 0..20 {
        sim.send(A, fa, fb, 1, k, 3000).unwrap();
        sim.send(B, fb, fa, 2, k, 100).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 20 && s.delivered(A, fa) == 20));
    assert_eq!(sim.sides[B].ep.flow_info(fb).unwrap().state, FlowState::Established);

    // A forged final ACK: no flow, a RST.
    let before = *sim.sides[B].ep.stats();
    let forged = FrameRepr {
        hdr: MachnetRepr::control(PacketType::Ack, 1_000, 0xdead_beef),
        ..forged_syn(Ipv4Addr::new(198, 19, 7, 7), 5555, 888, 0)
    };
    let flows = sim.sides[B].ep.flow_count();
    sim.inject(B, &forged);
    let after = *sim.sides[B].ep.stats();
    assert_eq!(sim.sides[B].ep.flow_count(), flows, "a forged ACK opened a flow");
    assert_eq!(after.syn_cookies_accepted, 1);
    assert_eq!(after.rx_no_flow, before.rx_no_flow + 1);
    assert_eq!(after.tx_rsts, before.tx_rsts + 1, "{after:?}");
}

/// As above, and the client's final ACK is lost too: its first DATA (ACKs in DATA, so it
/// carries the cookie as its `ackno`) rebuilds the flow instead of meeting a RST, the rebuilt
/// flow sends its SYN-ACK again, the client's ACK of it establishes the flow and the data
/// arrives. The same DATA with a wrong `ackno` still gets a RST.
#[test]
fn a_client_whose_final_ack_was_lost_too_is_accepted_by_the_cookie_in_its_data() {
    let mut acks = 0;
    let (mut sim, fa) = flooded_slow_client(move |f| {
        let first_ack = f.hdr.packet_type == PacketType::Ack && acks == 0;
        acks += usize::from(f.hdr.packet_type == PacketType::Ack);
        f.hdr.packet_type == PacketType::Syn || first_ack
    });
    assert!(sim.run_until(Duration::from_millis(50), |s| connected(s, 7)), "A did not connect");
    assert!(sim.sides[B].ep.stats().syn_evicted > 5_000);
    let before = *sim.sides[B].ep.stats();
    assert_eq!(before.syn_cookies_accepted, 0, "the final ACK was dropped: {before:?}");
    // A's first message: B has no flow for it (nor does the test know B's flow yet).
    sim.sides[B].allow_strangers = true;
    sim.send_unchecked(A, fa, 3, 0, 3000).unwrap();
    assert!(
        sim.run_until(Duration::from_secs(1), |s| s.event(B, |e| matches!(e, Event::Accepted { .. })).is_some()),
        "B never accepted: {:?} {:?}",
        sim.sides[B].ep.stats(),
        sim.sides[A].ep.stats()
    );
    let st = *sim.sides[B].ep.stats();
    assert_eq!(st.syn_cookies_accepted, 1, "{st:?}");
    assert_eq!(st.tx_rsts, before.tx_rsts, "no RST for the first DATA: {st:?}");
    let fb = accepted(&sim);
    // The first message is still on its way again (B dropped it, unacknowledged, when it
    // answered with the SYN-ACK): it is message 0 of B's flow.
    sim.sides[B].checker(fb, 3).expect.push_back(3000);
    for k in 1..20 {
        sim.send(A, fa, fb, 3, k, 3000).unwrap();
    }
    for k in 0..20 {
        sim.send(B, fb, fa, 2, k, 100).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(1), |s| s.delivered(B, fb) == 20 && s.delivered(A, fa) == 20));
    assert_eq!(sim.sides[B].strangers, 0, "the first message arrives on the accepted flow");
    assert_eq!(sim.sides[B].ep.flow_info(fb).unwrap().state, FlowState::Established);
}
