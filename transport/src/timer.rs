//! Retransmission timeout estimation (RFC 6298) at nanosecond resolution.

use core::time::Duration;
use machnet_net::time::Instant;

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
}

impl Default for RttEstimator {
    fn default() -> Self {
        Self::new()
    }
}

fn ns(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

impl RttEstimator {
    /// No samples yet.
    pub const fn new() -> Self {
        RttEstimator { srtt: 0, rttvar: 0, standing: 0, standing_start: 0, min: u32::MAX }
    }

    /// Feeds a sample that is both a full round trip and a network-delay measurement (the
    /// handshake; peers that echo no timestamps).
    pub fn sample(&mut self, now: Instant, rtt: Duration) {
        self.sample_full(rtt);
        self.sample_fabric(now, rtt);
    }

    /// Feeds a full round trip (send to acknowledgement, endpoint delays included): the smoothed
    /// RTT and variance behind the RTO and the tail-loss probe.
    pub fn sample_full(&mut self, rtt: Duration) {
        let r = ns(rtt).max(1);
        if self.srtt == 0 {
            self.srtt = r;
            self.rttvar = r / 2;
        } else {
            let err = self.srtt.abs_diff(r);
            self.rttvar = ((3 * u64::from(self.rttvar) + u64::from(err)) / 4) as u32;
            self.srtt = ((7 * u64::from(self.srtt) + u64::from(r)) / 8) as u32;
        }
    }

    /// Feeds a network-delay sample (the time endpoints held packets removed): the minimum and
    /// the standing RTT that congestion control compares.
    pub fn sample_fabric(&mut self, now: Instant, rtt: Duration) {
        let r = ns(rtt).max(1);
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

    /// The standing RTT: the smallest sample within about the last round trip.
    pub fn standing(&self) -> Duration {
        Duration::from_nanos(u64::from(self.standing))
    }

    /// Smallest sample, if any.
    pub fn min(&self) -> Option<Duration> {
        (self.min != u32::MAX).then(|| Duration::from_nanos(u64::from(self.min)))
    }

    /// `srtt + 4·rttvar` clamped to `[min, max]`, or `initial` before the first sample.
    pub fn rto(&self, initial: Duration, min: Duration, max: Duration) -> Duration {
        if self.srtt == 0 {
            return initial.clamp(min, max);
        }
        let base = u64::from(self.srtt) + 4 * u64::from(self.rttvar);
        Duration::from_nanos(base).clamp(min, max)
    }
}

/// Backs off `rto` by `2^shift`, capped at `max`.
pub fn backoff(rto: Duration, shift: u32, max: Duration) -> Duration {
    let factor = 1u32 << shift.min(16);
    rto.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6298_first_and_later_samples() {
        let mut e = RttEstimator::new();
        let (init, min, max) = (Duration::from_millis(5), Duration::from_millis(1), Duration::from_millis(100));
        assert_eq!(e.rto(init, min, max), init);
        e.sample(Instant::ZERO, Duration::from_micros(100));
        assert_eq!(e.srtt(), Duration::from_micros(100));
        assert_eq!(e.rttvar(), Duration::from_micros(50));
        // 100 + 4·50 = 300 us, below the 1 ms floor.
        assert_eq!(e.rto(init, min, max), min);
        e.sample(Instant::ZERO, Duration::from_millis(10));
        // rttvar = (3·50 + 9900)/4 = 2512.5 us; srtt = (7·100 + 10000)/8 = 1337.5 us.
        assert_eq!(e.srtt().as_nanos(), 1_337_500);
        assert_eq!(e.rttvar().as_nanos(), 2_512_500);
        assert_eq!(e.rto(init, min, max).as_nanos(), 1_337_500 + 4 * 2_512_500);
        assert_eq!(e.min(), Some(Duration::from_micros(100)));
        assert_eq!(e.standing(), Duration::from_micros(100), "the minimum within the window");
        // A round trip later the window starts over.
        e.sample(Instant::from_micros(100_000), Duration::from_micros(300));
        assert_eq!(e.standing(), Duration::from_micros(300));
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
