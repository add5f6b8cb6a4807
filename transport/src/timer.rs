//! Retransmission timeout estimation (RFC 6298) at nanosecond resolution.

use core::time::Duration;

/// Smoothed RTT and variance with the RFC 6298 gains (α = 1/8, β = 1/4), a floor and a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimator {
    /// Smoothed RTT in ns (0 until the first sample).
    srtt: u32,
    /// RTT variance in ns.
    rttvar: u32,
    /// Latest sample in ns.
    latest: u32,
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
        RttEstimator { srtt: 0, rttvar: 0, latest: 0, min: u32::MAX }
    }

    /// Feeds one RTT sample (samples above ~4.29 s saturate).
    pub fn sample(&mut self, rtt: Duration) {
        let r = ns(rtt).max(1);
        self.latest = r;
        self.min = self.min.min(r);
        if self.srtt == 0 {
            self.srtt = r;
            self.rttvar = r / 2;
        } else {
            let err = self.srtt.abs_diff(r);
            self.rttvar = ((3 * u64::from(self.rttvar) + u64::from(err)) / 4) as u32;
            self.srtt = ((7 * u64::from(self.srtt) + u64::from(r)) / 8) as u32;
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

    /// Latest sample.
    pub fn latest(&self) -> Duration {
        Duration::from_nanos(u64::from(self.latest))
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
        e.sample(Duration::from_micros(100));
        assert_eq!(e.srtt(), Duration::from_micros(100));
        assert_eq!(e.rttvar(), Duration::from_micros(50));
        // 100 + 4·50 = 300 us, below the 1 ms floor.
        assert_eq!(e.rto(init, min, max), min);
        e.sample(Duration::from_millis(10));
        // rttvar = (3·50 + 9900)/4 = 2512.5 us; srtt = (7·100 + 10000)/8 = 1337.5 us.
        assert_eq!(e.srtt().as_nanos(), 1_337_500);
        assert_eq!(e.rttvar().as_nanos(), 2_512_500);
        assert_eq!(e.rto(init, min, max).as_nanos(), 1_337_500 + 4 * 2_512_500);
        assert_eq!(e.min(), Some(Duration::from_micros(100)));
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
