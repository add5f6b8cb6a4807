//! The no_std example, run on the host: two endpoints exchange a request and a reply over the
//! in-memory link, on a virtual clock and on the wall clock.

use machnet_net::time::Instant;
use machnet_nostd_embed::{run_pair, LinkConfig, PairConfig, PairError};

/// A virtual clock: every reading is `step_ns` later than the previous one.
fn virtual_clock(step_ns: u64) -> impl FnMut() -> Instant {
    let mut t = 0;
    move || {
        t += step_ns;
        Instant::from_nanos(t)
    }
}

#[test]
fn a_clean_link_exchanges_a_multi_packet_message_without_retransmitting() {
    let report = run_pair(&mut virtual_clock(1_000), PairConfig::default()).expect("exchange completes");
    eprintln!("{report:?}");
    assert_eq!(report.frames_dropped, 0);
    assert_eq!(report.retransmissions, 0, "{report:?}");
    assert!(report.turns < 100, "a clean exchange takes a few turns: {report:?}");
}

#[test]
fn a_lossy_link_recovers_through_the_timers() {
    // Every 3rd frame is lost (the SYN-ACK among them): the exchange completes only if the
    // endpoints' timers fire on the caller's clock and they retransmit.
    let cfg = PairConfig { link: LinkConfig { drop_every: 3, ..LinkConfig::default() }, ..PairConfig::default() };
    let report = run_pair(&mut virtual_clock(10_000), cfg).expect("exchange completes despite loss");
    eprintln!("{report:?}");
    assert!(report.frames_dropped > 0, "{report:?}");
    assert!(report.retransmissions > 0, "{report:?}");
    assert!(report.elapsed_ns >= 1_000_000, "recovery waited for at least one timeout: {report:?}");
}

#[test]
fn a_clock_that_stands_still_never_recovers_a_loss() {
    // The same loss on a clock that does not move: no timer comes due, so the exchange cannot
    // finish. (It shows the clock is the caller's, and that the test above needs it.)
    let cfg = PairConfig {
        link: LinkConfig { drop_every: 3, ..LinkConfig::default() },
        max_turns: 10_000,
        ..PairConfig::default()
    };
    let mut frozen = || Instant::from_nanos(1);
    assert_eq!(run_pair(&mut frozen, cfg), Err(PairError::Timeout));
}

#[test]
fn the_wall_clock_drives_it_too() {
    let start = std::time::Instant::now();
    let mut wall = move || Instant::from_nanos(start.elapsed().as_nanos() as u64 + 1);
    let cfg = PairConfig { message_len: 100_000, ..PairConfig::default() };
    let report = run_pair(&mut wall, cfg).expect("exchange completes");
    eprintln!("{report:?}");
    assert_eq!(report.frames_dropped, 0);
}
