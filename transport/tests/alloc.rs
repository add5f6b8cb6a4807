//! A long steady transfer allocates nothing: not the endpoint, not (by construction) the
//! simulation around it. Loss and reordering make the retransmission paths run too.

mod sim;

use machnet_net::testutil::{count_allocs, CountingAlloc};
use machnet_transport::Config;
use sim::*;
use std::time::Duration;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn transfer(sim: &mut Sim, fa: machnet_transport::FlowId, fb: machnet_transport::FlowId, from: u64, n: u64) {
    let mut sent = from;
    let start = sim.now;
    while sim.delivered(B, fb) < from + n || sim.delivered(A, fa) < from + n {
        // Virtual time: a stalled transfer fails here, not after the flows give up.
        assert!(sim.now - start < Duration::from_secs(60), "transfer stalled at {}", sim.delivered(B, fb));
        while sent < from + n && sim.pending(B, fb) < 64 {
            sim.send(A, fa, fb, 1, sent, 3000).unwrap();
            sim.send(B, fb, fa, 2, sent, 700).unwrap();
            sent += 1;
        }
        assert!(sim.step());
    }
}

#[test]
fn steady_transfer_allocates_nothing() {
    let cfg = SimConfig::link(Config::default()).faults(0.02, 0.02, 0.01, 0.0, Duration::from_micros(2));
    let mut sim = Sim::new(cfg);
    let (fa, fb) = sim.connect(888);
    // Warm-up creates the checkers and grows their queues once.
    transfer(&mut sim, fa, fb, 0, 200);
    for (side, flow) in [(B, fb), (A, fa)] {
        sim.sides[side].checkers.iter_mut().find(|(f, _)| *f == flow).unwrap().1.expect.reserve(10_000);
    }
    // Positive control: the counter sees this thread's allocations.
    assert_eq!(count_allocs(|| std::hint::black_box(Box::new(7u64))).0, 1);
    let before = sim.sides[A].ep.stats().tx_retransmits;
    let (allocs, ()) = count_allocs(|| transfer(&mut sim, fa, fb, 200, 3000));
    let retx = sim.sides[A].ep.stats().tx_retransmits - before;
    assert!(retx > 0, "loss recovery ran");
    assert_eq!(allocs, 0, "{allocs} allocations during 3000 messages each way");
}
