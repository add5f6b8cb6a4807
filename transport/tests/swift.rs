//! Swift through a rate-limited bottleneck: queueing delay near the target, fair sharing.

mod sim;

use machnet_transport::cc::{CcConfig, SwiftParams};
use machnet_transport::{Config, Event, FlowId};
use sim::*;
use std::time::Duration;

const RATE: u64 = 10_000_000_000;
const MSG: usize = 64 * 1024;

fn bottleneck(cc: CcConfig) -> SimConfig {
    let mut cfg = SimConfig::link(Config { cc, ..Config::default() });
    cfg.ab.rate_bps = Some(RATE);
    cfg.ab.queue_bytes = 8 << 20; // deep enough that only the controller limits the queue
    cfg
}

/// Keeps `backlog` messages queued on each flow.
fn feed(sim: &mut Sim, flows: &[(FlowId, FlowId)], next: &mut [u64], backlog: usize) {
    for (i, &(fa, fb)) in flows.iter().enumerate() {
        while sim.pending(B, fb) < backlog {
            sim.send(A, fa, fb, i as u64, next[i], MSG).unwrap();
            next[i] += 1;
        }
    }
}

fn bytes(sim: &Sim, fb: FlowId) -> u64 {
    sim.sides[B].checkers.iter().find(|(f, _)| *f == fb).map_or(0, |(_, c)| c.bytes)
}

struct Run {
    queueing: Duration,
    target: Duration,
    goodput_gbps: f64,
}

/// One flow for 40 ms of virtual time; averages over the last 20 ms.
fn single_flow(cc: CcConfig) -> Run {
    let mut sim = Sim::new(bottleneck(cc));
    let (fa, fb) = sim.connect(888);
    let mut next = [0u64];
    let t0 = sim.now;
    let mut samples = Vec::new();
    let mut cwnds = Vec::new();
    let mut mark = None;
    while sim.now - t0 < Duration::from_millis(40) {
        feed(&mut sim, &[(fa, fb)], &mut next, 8);
        assert!(sim.step());
        if sim.now - t0 >= Duration::from_millis(20) {
            let (m0, b0) = *mark.get_or_insert((sim.now, bytes(&sim, fb)));
            let _ = (m0, b0);
            let info = sim.sides[A].ep.flow_info(fa).unwrap();
            samples.push(info.srtt.saturating_sub(info.min_rtt));
            cwnds.push(info.cwnd);
        }
    }
    let (m0, b0) = mark.unwrap();
    let goodput_gbps = (bytes(&sim, fb) - b0) as f64 * 8.0 / (sim.now - m0).as_secs_f64() / 1e9;
    let queueing = samples.iter().sum::<Duration>() / samples.len() as u32;
    let cwnd = cwnds.iter().sum::<f64>() / cwnds.len() as f64;
    let target = SwiftParams::default().target(cwnd);
    assert!(sim.sides[A].env.events.is_empty(), "{:?}", sim.sides[A].env.events);
    Run { queueing, target, goodput_gbps }
}

#[test]
fn swift_holds_queueing_delay_near_target_at_full_rate() {
    let swift = single_flow(CcConfig::default());
    let fixed = single_flow(CcConfig::Fixed { window: 256 });
    eprintln!(
        "swift: queueing {:?} (target {:?}), {:.2} Gbit/s; fixed(256): queueing {:?}, {:.2} Gbit/s",
        swift.queueing, swift.target, swift.goodput_gbps, fixed.queueing, fixed.goodput_gbps
    );
    let (q, t) = (swift.queueing.as_secs_f64(), swift.target.as_secs_f64());
    assert!(q > 0.5 * t && q < 1.5 * t, "queueing {:?} vs target {:?}", swift.queueing, swift.target);
    // The bottleneck stays busy: payload goodput above 90 % of the link (headers take ~6 %).
    assert!(swift.goodput_gbps > 0.9 * 10.0 * 1418.0 / 1514.0, "{:.2} Gbit/s", swift.goodput_gbps);
    // Without congestion control the window fills the queue.
    assert!(fixed.queueing > 4 * swift.queueing, "fixed window queueing {:?}", fixed.queueing);
}

#[test]
fn two_swift_flows_share_fairly() {
    let mut sim = Sim::new(bottleneck(CcConfig::default()));
    sim.sides[B].ep.listen(OWNER, 888).unwrap();
    let mut flows = Vec::new();
    let mut next = vec![0u64; 2];
    let t0 = sim.now;
    let mut window_start = None;
    let mut started = 0;
    while sim.now - t0 < Duration::from_millis(60) {
        // The second flow joins 10 ms after the first.
        let want = if sim.now - t0 >= Duration::from_millis(10) { 2 } else { 1 };
        if started < want {
            sim.start_connect(888, started as u64);
            started += 1;
        }
        while flows.len() < sim.sides[A].env.events.len() {
            let i = flows.len();
            let Event::Connected { flow: fa, tuple, .. } = sim.sides[A].env.events[i].1 else { panic!() };
            let fb = sim.sides[B].ep.flows().find(|f| f.tuple.remote_port == tuple.local_port).map(|f| f.id);
            match fb {
                Some(fb)
                    if sim.sides[B].ep.flow_info(fb).unwrap().state == machnet_transport::FlowState::Established =>
                {
                    flows.push((fa, fb))
                }
                _ => break,
            }
        }
        feed(&mut sim, &flows, &mut next, 8);
        if sim.now - t0 >= Duration::from_millis(30) && window_start.is_none() {
            window_start = Some([bytes(&sim, flows[0].1), bytes(&sim, flows[1].1)]);
        }
        assert!(sim.step());
    }
    let start = window_start.unwrap();
    let x = [bytes(&sim, flows[0].1) - start[0], bytes(&sim, flows[1].1) - start[1]];
    let (a, b) = (x[0] as f64, x[1] as f64);
    let jain = (a + b) * (a + b) / (2.0 * (a * a + b * b));
    eprintln!("flow bytes over the last 30 ms: {x:?}, Jain index {jain:.3}");
    assert!(jain >= 0.9, "Jain fairness {jain:.3} for {x:?}");
}
