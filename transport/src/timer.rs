//! Retransmission timeout estimation (RFC 6298) at nanosecond resolution.

use core::time::Duration;
use machnet_net::time::{dur_nanos, Instant};

/// Smoothed RTT and variance with the RFC 6298 gains (α = 1/8, β = 1/4), a floor and a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimator {
    /// Smoothed RTT in ns (0 until the first sample).
    srtt: u32,
    /// RTT variance in ns.
    rttvar: u32,
    /// Smallest sample of the current standing window, ns.
    standing: u32,
    /// Start of the standing window, µs (wrapping).
    standing_start: u32,
    /// Smallest sample seen, in ns (u32::MAX until the first sample).
    min: u32,
    /// The largest full round trip of the current and of the previous epoch (~1 s each), ns:
    /// a floor for the RTO, so that delays this path showed lately (a peer or this end not
    /// scheduled for milliseconds on a busy host) do not fire spurious timeouts.
    max_cur: u32,
    max_prev: u32,
    /// Start of the current epoch, ms (wrapping).
    max_epoch: u32,
}

/// Length of an epoch of the windowed maximum, ms.
const MAX_EPOCH_MS: u32 = 1000;

impl Default for RttEstimator {
    fn default() -> Self {
        Self::new()
    }
}

/// A sample as stored: nanoseconds in 32 bits (4.29 s at most), at least 1.
#[inline]
fn clamp_ns(rtt: u64) -> u32 {
    u32::try_from(rtt).unwrap_or(u32::MAX).max(1)
}

impl RttEstimator {
    /// No samples yet.
    pub const fn new() -> Self {
        RttEstimator {
            srtt: 0,
            rttvar: 0,
            standing: 0,
            standing_start: 0,
            min: u32::MAX,
            max_cur: 0,
            max_prev: 0,
            max_epoch: 0,
        }
    }

    /// Feeds a sample that is both a full round trip and a network-delay measurement (the
    /// handshake; peers that echo no timestamps).
    pub fn sample(&mut self, now: Instant, rtt: Duration) {
        self.sample_full_ns(now, dur_nanos(rtt));
        self.sample_fabric_ns(now, dur_nanos(rtt));
    }

    /// Feeds a full round trip of `rtt` nanoseconds (send to acknowledgement, endpoint delays
    /// included): the smoothed RTT and variance behind the RTO and the tail-loss probe.
    #[inline]
    pub fn sample_full_ns(&mut self, now: Instant, rtt: u64) {
        let r = clamp_ns(rtt);
        let now_ms = (now.as_nanos() / 1_000_000) as u32;
        if now_ms.wrapping_sub(self.max_epoch) >= MAX_EPOCH_MS {
            self.max_prev = self.max_cur;
            self.max_cur = 0;
            self.max_epoch = now_ms;
        }
        self.max_cur = self.max_cur.max(r);
        if self.srtt == 0 {
            self.srtt = r;
            self.rttvar = r / 2;
        } else {
            let err = self.srtt.abs_diff(r);
            self.rttvar = ((3 * u64::from(self.rttvar) + u64::from(err)) / 4) as u32;
            self.srtt = ((7 * u64::from(self.srtt) + u64::from(r)) / 8) as u32;
        }
    }

    /// Feeds a network-delay sample of `rtt` nanoseconds (the time endpoints held packets
    /// removed): the minimum and the standing RTT that congestion control compares.
    #[inline]
    pub fn sample_fabric_ns(&mut self, now: Instant, rtt: u64) {
        let r = clamp_ns(rtt);
        self.min = self.min.min(r);
        // Standing RTT (after Copa): the smallest sample within the last round trip (at least
        // 20 µs). Delay added by endpoints (a peer scheduled late, a sleeping core) is one-sided
        // noise that this minimum filters out; queueing that persists for a round trip stays.
        let now_us = (now.as_nanos() / 1000) as u32;
        let window_us = (self.srtt / 1000).max(20);
        if self.standing == 0 || now_us.wrapping_sub(self.standing_start) > window_us {
            self.standing = r;
            self.standing_start = now_us;
        } else {
            self.standing = self.standing.min(r);
        }
    }

    /// True once a sample has been taken.
    pub fn has_sample(&self) -> bool {
        self.srtt != 0
    }

    /// Smoothed RTT (zero before the first sample).
    pub fn srtt(&self) -> Duration {
        Duration::from_nanos(u64::from(self.srtt))
    }

    /// RTT variance.
    pub fn rttvar(&self) -> Duration {
        Duration::from_nanos(u64::from(self.rttvar))
    }

    /// Smallest sample, if any.
    pub fn min(&self) -> Option<Duration> {
        (self.min != u32::MAX).then(|| Duration::from_nanos(u64::from(self.min)))
    }

    /// The retransmission timeout in nanoseconds: `srtt + 4·rttvar`, and at least 1.25 × the
    /// largest recent full round trip, clamped to `[min, max]`; `initial` before the first
    /// sample. RFC 6298's estimate follows a heavy-tailed delay only slowly: after a run of fast
    /// samples its variance is small and the next late ACK (a process not scheduled for a few
    /// milliseconds) fires the timer; a floor at the delays the path showed lately keeps such
    /// timeouts rare. In nanoseconds because every DATA packet arms the timer (`Duration`'s
    /// conversions and comparisons cost several times this arithmetic: callgrind, S2 window 1).
    #[inline]
    pub fn rto_ns(&self, initial: u64, min: u64, max: u64) -> u64 {
        let rto = if self.srtt == 0 {
            initial
        } else {
            let base = u64::from(self.srtt) + 4 * u64::from(self.rttvar);
            let recent = u64::from(self.max_cur.max(self.max_prev));
            base.max(recent + recent / 4)
        };
        rto.max(min).min(max)
    }

    /// [`srtt`](Self::srtt) in nanoseconds.
    #[inline]
    pub fn srtt_ns(&self) -> u64 {
        u64::from(self.srtt)
    }

    /// The largest full round trip of the last one to two seconds, in nanoseconds.
    #[inline]
    pub fn recent_max_ns(&self) -> u64 {
        u64::from(self.max_cur.max(self.max_prev))
    }

    /// The standing RTT in nanoseconds: the smallest sample within about the last round trip
    /// (0 before a sample).
    #[inline]
    pub fn standing_ns(&self) -> u64 {
        u64::from(self.standing)
    }

    /// [`min`](Self::min) in nanoseconds.
    #[inline]
    pub fn min_ns(&self) -> Option<u64> {
        (self.min != u32::MAX).then_some(u64::from(self.min))
    }
}

/// Backs off `rto` by `2^shift`, capped at `max`.
pub fn backoff(rto: Duration, shift: u32, max: Duration) -> Duration {
    Duration::from_nanos(backoff_ns(dur_nanos(rto), shift, dur_nanos(max)))
}

/// [`backoff`] in nanoseconds.
#[inline]
pub fn backoff_ns(rto: u64, shift: u32, max: u64) -> u64 {
    rto.saturating_mul(1u64 << shift.min(16)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RTO in nanoseconds, as a `Duration` (what these tests compare).
    fn rto(e: &RttEstimator, initial: Duration, min: Duration, max: Duration) -> Duration {
        Duration::from_nanos(e.rto_ns(dur_nanos(initial), dur_nanos(min), dur_nanos(max)))
    }

    /// The nanosecond accessors read what the `Duration` ones do, and `backoff` is `backoff_ns`.
    #[test]
    fn nanosecond_forms_agree() {
        let max = Duration::from_millis(100);
        let mut e = RttEstimator::new();
        assert_eq!(e.min_ns(), None);
        for (i, us) in [100u64, 10_000, 3, 250_000, 40, 40, 900].into_iter().enumerate() {
            e.sample(Instant::from_micros(i as u64 * 50), Duration::from_micros(us));
            assert_eq!(e.srtt_ns(), dur_nanos(e.srtt()));
            assert_eq!(e.min_ns(), e.min().map(dur_nanos));
        }
        assert_eq!(e.recent_max_ns(), 250_000_000, "the largest sample of the epoch");
        for shift in [0, 1, 3, 16, 40] {
            let r = Duration::from_micros(1500);
            assert_eq!(backoff_ns(dur_nanos(r), shift, dur_nanos(max)), dur_nanos(backoff(r, shift, max)));
        }
        assert_eq!(backoff_ns(u64::MAX / 2, 3, u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn rfc6298_first_and_later_samples() {
        let mut e = RttEstimator::new();
        let (init, min, max) = (Duration::from_millis(5), Duration::from_millis(1), Duration::from_millis(100));
        assert_eq!(rto(&e, init, min, max), init);
        e.sample(Instant::ZERO, Duration::from_micros(100));
        assert_eq!(e.srtt(), Duration::from_micros(100));
        assert_eq!(e.rttvar(), Duration::from_micros(50));
        // 100 + 4·50 = 300 us, below the 1 ms floor.
        assert_eq!(rto(&e, init, min, max), min);
        e.sample(Instant::ZERO, Duration::from_millis(10));
        // rttvar = (3·50 + 9900)/4 = 2512.5 us; srtt = (7·100 + 10000)/8 = 1337.5 us.
        assert_eq!(e.srtt().as_nanos(), 1_337_500);
        assert_eq!(e.rttvar().as_nanos(), 2_512_500);
        // srtt + 4·rttvar = 11.39 ms, below 1.25 × the 10 ms sample just seen.
        assert_eq!(rto(&e, init, min, max).as_nanos(), 12_500_000);
        assert_eq!(e.min(), Some(Duration::from_micros(100)));
        assert_eq!(e.standing_ns(), 100_000, "the minimum within the window");
        // A round trip later the window starts over.
        e.sample(Instant::from_micros(100_000), Duration::from_micros(300));
        assert_eq!(e.standing_ns(), 300_000);
    }

    #[test]
    fn the_rto_floor_of_recent_delays_is_forgotten_after_two_epochs() {
        let (init, min, max) = (Duration::from_millis(5), Duration::from_millis(1), Duration::from_millis(100));
        let mut e = RttEstimator::new();
        let mut now = Instant::from_micros(1_000_000);
        e.sample(now, Duration::from_millis(8));
        for _ in 0..100 {
            now += Duration::from_micros(100);
            e.sample(now, Duration::from_micros(50));
        }
        // The smoothed estimate forgot the 8 ms sample; the floor did not.
        assert_eq!(rto(&e, init, min, max), Duration::from_millis(10));
        // Two epochs of fast samples later it is gone.
        for _ in 0..3 {
            now += Duration::from_millis(1000);
            e.sample(now, Duration::from_micros(50));
        }
        assert_eq!(rto(&e, init, min, max), min);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let max = Duration::from_millis(100);
        assert_eq!(backoff(Duration::from_millis(1), 0, max), Duration::from_millis(1));
        assert_eq!(backoff(Duration::from_millis(1), 3, max), Duration::from_millis(8));
        assert_eq!(backoff(Duration::from_millis(1), 10, max), max);
        assert_eq!(backoff(Duration::from_millis(1), 40, max), max);
    }
}
