//! Transfers under faults: exactly-once, in-order delivery, no leaks, bounded completion time.

mod sim;

use machnet_transport::cc::CcConfig;
use machnet_transport::Config;
use sim::*;
use std::time::Duration;

/// Sends `sizes` from A to B (pipelined: as many as the sender's segment pool allows), and the
/// same sizes B to A, then checks every message arrived once, in order, intact, and that both
/// sides hold no segment afterwards. Returns the virtual time the transfer took.
#[track_caller]
fn exchange(cfg: SimConfig, sizes: &[usize]) -> Duration {
    let mut sim = Sim::new(cfg);
    let (fa, fb) = sim.connect(888);
    let start = sim.now;
    let mut next = [0usize; 2];
    let limit = Duration::from_secs(600);
    loop {
        // Feed each direction while its sender has room for the next message.
        for (side, flow, peer) in [(A, fa, fb), (B, fb, fa)] {
            while next[side] < sizes.len() {
                let len = sizes[next[side]];
                let segs = len.div_ceil(SEG_SIZE);
                let s = &sim.sides[side];
                if s.env.segs.tx_in_use + segs > 24_000 {
                    break;
                }
                sim.send(side, flow, peer, side as u64, next[side] as u64, len).expect("send");
                next[side] += 1;
            }
        }
        let all_sent = next.iter().all(|&n| n == sizes.len());
        let all_done = sim.delivered(B, fb) == sizes.len() as u64 && sim.delivered(A, fa) == sizes.len() as u64;
        if all_sent && all_done {
            break;
        }
        assert!(
            sim.now - start < limit,
            "transfer stalled: delivered A {} B {} of {}",
            sim.delivered(A, fa),
            sim.delivered(B, fb),
            sizes.len()
        );
        assert!(
            sim.step(),
            "nothing scheduled but transfer incomplete: A {} B {}",
            sim.delivered(A, fa),
            sim.delivered(B, fb)
        );
    }
    let took = sim.now - start;
    // Let the last ACKs land, then nothing may be held.
    sim.run_until(Duration::from_millis(500), |s| s.sides.iter().all(|x| x.env.segs.in_use() == 0));
    for (i, s) in sim.sides.iter().enumerate() {
        assert_eq!(
            s.env.segs.in_use(),
            0,
            "side {i} leaks segments: tx {} rx {}",
            s.env.segs.tx_in_use,
            s.env.segs.rx_in_use
        );
        assert!(s.env.events.is_empty(), "side {i} unexpected events {:?}", s.env.events);
    }
    took
}

fn cfg_window(window: u32) -> Config {
    // Enough consecutive timeouts that 20 % loss each way never fails a flow by chance.
    Config { cc: CcConfig::Fixed { window }, ..Config::default() }
}

/// The fastest the transfer could go on this link: every byte serialised at the bottleneck
/// rate, or `window` packets per round trip, whichever is slower, plus one round trip.
fn ideal(sizes: &[usize], window: u32) -> Duration {
    let rate = 10e9;
    let one_way = 5e-6;
    let pkts: usize = sizes.iter().map(|s| s.div_ceil(SEG_SIZE)).sum();
    let bytes: usize = sizes.iter().sum::<usize>() + pkts * 96;
    let ser = bytes as f64 * 8.0 / rate;
    let rtt = 2.0 * one_way + 1514.0 * 8.0 / rate;
    let windowed = pkts as f64 / f64::from(window) * rtt;
    Duration::from_secs_f64(ser.max(windowed) + rtt)
}

/// The documented completion-time bound (docs/protocol.md, "Loss recovery"):
///
/// `2 · ideal / (1 − p)²  +  8 · rto_min · p_rt · packets / window  +  32 · rto_min`
///
/// where `p` is the one-way loss rate and `p_rt = 1 − (1 − p)²` the chance that a packet or its
/// acknowledgement is lost. The first term is the ideal stretched by the bandwidth that
/// retransmissions take, with a factor 2 of slack; the second charges every lost round trip
/// eight RTO floors, shared by the packets of a window that recover together; the last covers a
/// tail of five backed-off timeouts (1 + 2 + 4 + 8 + 16 ms) at the end of a transfer.
fn bound(ideal: Duration, p: f64, sizes: &[usize], window: u32) -> Duration {
    let rto_min = Config::default().rto_min.as_secs_f64();
    let pkts: usize = sizes.iter().map(|s| s.div_ceil(SEG_SIZE)).sum();
    let p_rt = 1.0 - (1.0 - p) * (1.0 - p);
    let secs = 2.0 * ideal.as_secs_f64() / ((1.0 - p) * (1.0 - p))
        + 8.0 * rto_min * p_rt * pkts as f64 / f64::from(window)
        + 32.0 * rto_min;
    Duration::from_secs_f64(secs)
}

fn classes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("1 B", vec![1; 200]),
        ("1418 B", vec![1418; 100]),
        ("1419 B", vec![1419; 100]),
        ("64 KiB", vec![65536; 16]),
        ("8 MiB", vec![8 << 20; 2]),
    ]
}

fn matrix(loss: f64) {
    for window in [1u32, 32, 256] {
        for (name, sizes) in classes() {
            // Stop-and-wait over 8 MiB is 5917 round trips per message: one message suffices.
            let sizes = if window == 1 && sizes[0] == 8 << 20 { vec![8 << 20] } else { sizes };
            let cfg = SimConfig::link(cfg_window(window)).faults(loss, 0.02, 0.01, 0.005, Duration::from_micros(2));
            let took = exchange(cfg, &sizes);
            let ideal = ideal(&sizes, window);
            let bound = bound(ideal, loss, &sizes, window);
            eprintln!(
                "loss {:>4.1}% window {window:>3} {name:>6}: {:>10.3} ms, ideal {:>9.3} ms, ratio {:>6.2}, bound {:>9.3} ms",
                loss * 100.0,
                took.as_secs_f64() * 1e3,
                ideal.as_secs_f64() * 1e3,
                took.as_secs_f64() / ideal.as_secs_f64(),
                bound.as_secs_f64() * 1e3,
            );
            assert!(took <= bound, "loss {loss} window {window} {name}: took {took:?}, bound {bound:?}");
        }
    }
}

#[test]
fn matrix_loss_0() {
    matrix(0.0);
}

#[test]
fn matrix_loss_1() {
    matrix(0.01);
}

#[test]
fn matrix_loss_5() {
    matrix(0.05);
}

#[test]
fn matrix_loss_20() {
    matrix(0.20);
}

#[test]
fn clean_link_small_and_large_messages() {
    let sizes: Vec<usize> = [1, 1418, 1419, 65536].iter().flat_map(|&s| std::iter::repeat_n(s, 20)).collect();
    let took = exchange(SimConfig::link(Config::default()), &sizes);
    eprintln!("clean: {:?}", took);
}
