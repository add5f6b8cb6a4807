//! Congestion control, as an enum rather than a trait object.
//!
//! * [`CcConfig::Fixed`]: a constant window, the original Machnet's behaviour (32 packets).
//! * [`CcConfig::Swift`]: Swift (Kumar et al., "Swift: Delay is Simple and Effective for
//!   Congestion Control in the Datacenter", SIGCOMM 2020), a delay-based AIMD:
//!   - **target delay** = `base_target` + a flow-scaling term that grows as the window shrinks:
//!     `clamp(α/√cwnd + β, 0, fs_range)`, with α, β chosen so the term is `fs_range` at
//!     `cwnd = fs_min_cwnd` and 0 at `cwnd = fs_max_cwnd`. Swift uses the window as the inverse
//!     proxy for the number of competing flows: many flows ⇒ small windows ⇒ a larger target,
//!     which keeps their sum of queueing stable and is what makes competing flows converge.
//!   - **additive increase**: below target, `cwnd += ai · acked / cwnd` (≈ `ai` packets per RTT);
//!   - **multiplicative decrease**: above target, at most once per RTT,
//!     `cwnd ·= max(1 − beta · (delay − target)/delay, 1 − max_mdf)`;
//!   - on fast recovery `cwnd ·= 1 − max_mdf` (once per RTT); on a retransmission timeout the
//!     same, and after `retx_reset_threshold` consecutive timeouts `cwnd = min_cwnd`;
//!   - `min_cwnd ≤ cwnd ≤ max_cwnd`.
//!
//!   One adaptation: the paper compares a fabric delay measured by NIC timestamps against a
//!   target that includes the propagation delay of a known topology. A VM knows neither, and
//!   its base RTT ranges from ~1 µs (memif) to ~100 µs (kernel UDP), so we compare the
//!   *queueing* delay — the RTT sample minus the path's base RTT — against the target, and the
//!   targets below are queueing budgets. The base RTT belongs to the path, not the flow: the
//!   endpoint keeps it per peer, as the smallest sample of any flow to that peer over the last
//!   10–20 s (a two-epoch windowed minimum, so a route change is forgotten). A flow that measured
//!   its own minimum would, if it started while other flows had already built a queue, take
//!   that queue for the base and never yield (the "latecomer" unfairness of delay-based
//!   control). Measured in `tests/swift.rs`: with per-flow minima a flow joining 10 ms late
//!   took 96 % of a 10 Gbit/s bottleneck (Jain index 0.54); with the per-path base the two
//!   flows split it evenly (Jain index 1.00).

use crate::timer::RttEstimator;
use core::time::Duration;
use machnet_net::time::Instant;

/// Swift's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwiftParams {
    /// Queueing delay allowed at large windows (25 µs).
    pub base_target: Duration,
    /// Extra queueing delay allowed at small windows (50 µs).
    pub fs_range: Duration,
    /// Window at which the flow-scaling term is `fs_range` (1 packet).
    pub fs_min_cwnd: f64,
    /// Window at and above which the flow-scaling term is 0 (128 packets).
    pub fs_max_cwnd: f64,
    /// Additive increase per RTT in packets (1.0).
    pub ai: f64,
    /// Multiplicative decrease gain (0.8).
    pub beta: f64,
    /// Largest multiplicative decrease per RTT (0.5).
    pub max_mdf: f64,
    /// Window floor in packets (1.0).
    pub min_cwnd: f64,
    /// Window cap in packets (256; also capped by the transport's window).
    pub max_cwnd: f64,
    /// Initial window in packets (32, the original's constant window).
    pub init_cwnd: f64,
    /// Consecutive retransmission timeouts after which the window drops to the floor (3).
    pub retx_reset_threshold: u32,
    /// Delay alone never takes the window below this many packets (32, the original's fixed
    /// window); loss can. On a VM the RTT also holds the time a process waited for a CPU,
    /// which no window size changes: a delay-based controller that reads it as queueing
    /// shrinks the window for nothing (measured: a fifth of the fixed window's throughput on a
    /// busy host). With this floor Swift is never slower than the original's fixed window and
    /// still backs off on real congestion (loss). 1 restores pure Swift.
    pub delay_floor: f64,
}

impl Default for SwiftParams {
    fn default() -> Self {
        SwiftParams {
            base_target: Duration::from_micros(25),
            fs_range: Duration::from_micros(50),
            fs_min_cwnd: 1.0,
            fs_max_cwnd: 128.0,
            ai: 1.0,
            beta: 0.8,
            max_mdf: 0.5,
            min_cwnd: 1.0,
            max_cwnd: 256.0,
            init_cwnd: 32.0,
            retx_reset_threshold: 3,
            delay_floor: 32.0,
        }
    }
}

impl SwiftParams {
    /// The target queueing delay at window `cwnd`.
    pub fn target(&self, cwnd: f64) -> Duration {
        self.base_target + Duration::from_secs_f64(self.flow_scaling(cwnd))
    }

    /// [`target`](Self::target) in seconds, as the per-ACK path compares it
    /// (`Duration::from_secs_f64` alone costs more than the rest of the formula: callgrind).
    #[inline]
    pub fn target_secs(&self, cwnd: f64) -> f64 {
        self.base_target.as_secs_f64() + self.flow_scaling(cwnd)
    }

    /// The flow-scaling term in seconds: `fs_range` at `fs_min_cwnd`, 0 from `fs_max_cwnd`.
    #[inline]
    fn flow_scaling(&self, cwnd: f64) -> f64 {
        let range = self.fs_range.as_secs_f64();
        // 0 from fs_max_cwnd on (the clamp below gives it too): a flow past it, as every
        // small-RPC flow is, pays no square roots or divisions per ACK.
        if range == 0.0 || cwnd >= self.fs_max_cwnd {
            return 0.0;
        }
        let inv_min = 1.0 / sqrt(self.fs_min_cwnd);
        let inv_max = 1.0 / sqrt(self.fs_max_cwnd);
        let alpha = range / (inv_min - inv_max);
        let beta = -alpha * inv_max;
        (alpha / sqrt(cwnd.max(1e-3)) + beta).clamp(0.0, range)
    }
}

/// The square root: the standard library's (the CPU instruction) when there is one.
#[cfg(feature = "std")]
#[inline]
fn sqrt(x: f64) -> f64 {
    x.sqrt()
}

/// The square root: without `std`, `f64::sqrt` is not available (it lives in `std` until
/// `core_float_math` is stable), so [`sqrt_core`].
#[cfg(not(feature = "std"))]
#[inline]
fn sqrt(x: f64) -> f64 {
    sqrt_core(x)
}

/// The correctly rounded square root (as IEEE 754 and `f64::sqrt` define it: the exact root
/// rounded to nearest, ties to even) from integer arithmetic, for builds without `std`.
/// `tests::sqrt_core_matches_std` holds it to the standard library's bit for bit.
#[cfg_attr(feature = "std", allow(dead_code))]
fn sqrt_core(x: f64) -> f64 {
    if x.is_nan() || x == 0.0 || x == f64::INFINITY {
        return x; // NaN, ±0 and +∞ are their own roots
    }
    if x < 0.0 {
        return f64::NAN;
    }
    const MANT: u64 = (1 << 52) - 1;
    let bits = x.to_bits();
    let biased = (bits >> 52) as i32;
    // x = m · 2^e with m an integer in [2^52, 2^53).
    let (mut m, mut e) = if biased == 0 {
        let shift = (bits & MANT).leading_zeros() - 11; // a subnormal: normalise it
        (u128::from(bits & MANT) << shift, -1074 - shift as i32)
    } else {
        (u128::from((bits & MANT) | (1 << 52)), biased - 1075)
    };
    if e % 2 != 0 {
        m <<= 1; // an even exponent halves exactly
        e -= 1;
    }
    // √(m · 2^56) lies in [2^54, 2^55): 53 bits of result, a guard bit and a round bit; the
    // remainder says whether anything lies beyond them.
    let wide = m << 56;
    let r = wide.isqrt();
    let inexact = r * r != wide;
    let mut q = (r >> 2) as u64;
    let guard = r & 2 != 0;
    let sticky = r & 1 != 0 || inexact;
    let mut exp = (e - 56) / 2 + 2; // √x = q · 2^exp before rounding
    if guard && (sticky || q & 1 == 1) {
        q += 1;
        if q == 1 << 53 {
            q >>= 1;
            exp += 1;
        }
    }
    // q in [2^52, 2^53): the value is 1.f · 2^(exp + 52), always a normal number.
    f64::from_bits((((exp + 52 + 1023) as u64) << 52) | (q & MANT))
}

/// Which algorithm, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CcConfig {
    /// A constant window in packets (the original: 32).
    Fixed {
        /// Packets in flight.
        window: u32,
    },
    /// Swift.
    Swift(SwiftParams),
}

impl Default for CcConfig {
    fn default() -> Self {
        CcConfig::Swift(SwiftParams::default())
    }
}

impl CcConfig {
    /// The original Machnet's behaviour: a fixed window of 32 packets.
    pub const ORIGINAL: CcConfig = CcConfig::Fixed { window: 32 };

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            CcConfig::Fixed { window } if *window == 0 => Err("fixed window must be positive"),
            CcConfig::Fixed { .. } => Ok(()),
            CcConfig::Swift(p) => {
                if !(p.min_cwnd > 0.0 && p.min_cwnd <= p.init_cwnd && p.init_cwnd <= p.max_cwnd) {
                    return Err("swift needs 0 < min_cwnd <= init_cwnd <= max_cwnd");
                }
                if !(p.fs_min_cwnd > 0.0 && p.fs_min_cwnd < p.fs_max_cwnd) {
                    return Err("swift needs 0 < fs_min_cwnd < fs_max_cwnd");
                }
                if !(p.ai > 0.0 && p.beta > 0.0 && p.max_mdf > 0.0 && p.max_mdf < 1.0) {
                    return Err("swift needs ai > 0, beta > 0 and 0 < max_mdf < 1");
                }
                if !(p.delay_floor >= 1.0 && p.delay_floor <= p.max_cwnd) {
                    return Err("swift needs 1 <= delay_floor <= max_cwnd");
                }
                Ok(())
            }
        }
    }
}

/// Per-flow congestion state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CongestionControl {
    /// Constant window.
    Fixed {
        /// Packets in flight.
        window: u32,
    },
    /// Swift state.
    Swift {
        /// Congestion window in packets.
        cwnd: f32,
        /// Consecutive retransmission timeouts.
        retx: u8,
        /// Last multiplicative decrease (ns).
        last_decrease: u64,
    },
}

impl CongestionControl {
    /// Initial state for a new flow.
    pub fn new(cfg: &CcConfig) -> Self {
        match cfg {
            CcConfig::Fixed { window } => CongestionControl::Fixed { window: *window },
            CcConfig::Swift(p) => CongestionControl::Swift { cwnd: p.init_cwnd as f32, last_decrease: 0, retx: 0 },
        }
    }

    /// Packets allowed in flight (at least 1).
    #[inline]
    pub fn window(&self) -> u32 {
        match *self {
            CongestionControl::Fixed { window } => window.max(1),
            CongestionControl::Swift { cwnd, .. } => (cwnd as u32).max(1),
        }
    }

    /// The window as a real number (Swift) or the fixed window.
    pub fn cwnd(&self) -> f64 {
        match *self {
            CongestionControl::Fixed { window } => f64::from(window),
            CongestionControl::Swift { cwnd, .. } => f64::from(cwnd),
        }
    }

    fn can_decrease(last_decrease: u64, now: Instant, rtt: &RttEstimator) -> bool {
        now.as_nanos().saturating_sub(last_decrease) >= rtt.srtt_ns()
    }

    /// `acked` packets were newly acknowledged; `sample` is the RTT sample this ACK gave, if
    /// any, and `base` the path's base RTT (the smallest recent sample of any flow to the peer),
    /// from which queueing delay is measured, both in nanoseconds (this runs for every ACK:
    /// no `Duration` conversions).
    pub fn on_ack(
        &mut self,
        cfg: &CcConfig,
        now: Instant,
        acked: u32,
        sample: Option<u64>,
        base: Option<u64>,
        rtt: &RttEstimator,
    ) {
        let (CongestionControl::Swift { cwnd: stored, last_decrease, retx }, CcConfig::Swift(p)) = (self, cfg) else {
            return;
        };
        *retx = 0;
        let Some(sample) = sample else {
            return;
        };
        let mut cwnd = f64::from(*stored);
        let base = base.or(rtt.min_ns()).unwrap_or(sample);
        // Queueing is judged on the standing RTT (the window's smallest sample), not the last.
        let standing = match rtt.standing_ns() {
            0 => sample,
            s => s.min(sample),
        };
        let delay = standing.saturating_sub(base) as f64 * 1e-9;
        let target = p.target_secs(cwnd);
        // Below the delay floor delay does not hold the window back either: on a busy host
        // the RTT holds CPU waits that never fall under the target, and a window that loss
        // took below the floor would never grow again (measured: 1 to 2 packets for good
        // under 5 % random loss beside two CPU hogs, 0.35 MB/s). There the controller is
        // loss-based AIMD.
        if delay < target || cwnd < p.delay_floor {
            let acked = f64::from(acked);
            if cwnd >= 1.0 {
                cwnd += p.ai * acked / cwnd;
            } else {
                cwnd += p.ai * acked;
            }
        } else if Self::can_decrease(*last_decrease, now, rtt) && cwnd > p.delay_floor {
            let factor = (1.0 - p.beta * (delay - target) / delay).max(1.0 - p.max_mdf);
            cwnd = (cwnd * factor).max(p.delay_floor);
            *last_decrease = now.as_nanos();
        }
        *stored = cwnd.clamp(p.min_cwnd, p.max_cwnd) as f32;
    }

    /// A retransmission timeout turned out spurious (the ACK echoes the original transmission):
    /// restore the window saved when it fired.
    pub fn undo_timeout(&mut self, saved_cwnd: f32) {
        if let CongestionControl::Swift { cwnd, retx, .. } = self {
            *cwnd = cwnd.max(saved_cwnd);
            *retx = 0;
        }
    }

    /// Loss detected by duplicate ACKs or SACK (fast recovery started).
    pub fn on_fast_recovery(&mut self, cfg: &CcConfig, now: Instant, rtt: &RttEstimator) {
        if let (CongestionControl::Swift { cwnd, last_decrease, .. }, CcConfig::Swift(p)) = (self, cfg) {
            if Self::can_decrease(*last_decrease, now, rtt) {
                *cwnd = (f64::from(*cwnd) * (1.0 - p.max_mdf)).clamp(p.min_cwnd, p.max_cwnd) as f32;
                *last_decrease = now.as_nanos();
            }
        }
    }

    /// A retransmission timeout fired.
    pub fn on_timeout(&mut self, cfg: &CcConfig, now: Instant, rtt: &RttEstimator) {
        if let (CongestionControl::Swift { cwnd, last_decrease, retx }, CcConfig::Swift(p)) = (self, cfg) {
            *retx = retx.saturating_add(1);
            if u32::from(*retx) >= p.retx_reset_threshold {
                *cwnd = p.min_cwnd as f32;
                *last_decrease = now.as_nanos();
            } else if Self::can_decrease(*last_decrease, now, rtt) {
                *cwnd = (f64::from(*cwnd) * (1.0 - p.max_mdf)).clamp(p.min_cwnd, p.max_cwnd) as f32;
                *last_decrease = now.as_nanos();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use machnet_net::time::dur_nanos;

    #[test]
    fn sqrt_core_matches_std() {
        let check = |x: f64| {
            let (got, want) = (sqrt_core(x), x.sqrt());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "sqrt({x:e}): {got:e} != {want:e}"
            );
        };
        for x in [0.0, -0.0, 1.0, 2.0, 4.0, 0.25, 1e-3, 32.0, 256.0, 1e300, f64::MAX, f64::MIN_POSITIVE, 5e-324] {
            check(x);
        }
        for x in [-1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            check(x);
        }
        // Random bit patterns (every exponent, subnormals included), perfect squares and their
        // neighbours (where rounding is closest to a tie).
        let mut s = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..200_000u64 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            check(f64::from_bits(s & !(1 << 63)));
            let sq = (i as f64) * (i as f64);
            check(sq);
            check(f64::from_bits(sq.to_bits() + 1));
            check(f64::from_bits(sq.to_bits().saturating_sub(1)));
        }
    }

    fn rtt_with(min_us: u64) -> RttEstimator {
        let mut r = RttEstimator::new();
        r.sample(Instant::ZERO, Duration::from_micros(min_us));
        r
    }

    /// The per-ACK form of the target is the `Duration` one (to the nanosecond it rounds to).
    #[test]
    fn target_secs_is_target() {
        for p in [SwiftParams::default(), SwiftParams { fs_range: Duration::ZERO, ..SwiftParams::default() }] {
            for cwnd in [0.0, 0.5, 1.0, 1.5, 2.0, 7.3, 16.0, 32.0, 100.0, 128.0, 129.0, 256.0, 1e6] {
                let (secs, d) = (p.target_secs(cwnd), p.target(cwnd).as_secs_f64());
                assert!((secs - d).abs() < 1e-9, "cwnd {cwnd}: {secs} vs {d}");
            }
        }
    }

    #[test]
    fn target_scales_with_window() {
        let p = SwiftParams::default();
        assert_eq!(p.target(1.0), p.base_target + p.fs_range);
        assert_eq!(p.target(128.0), p.base_target);
        assert_eq!(p.target(1000.0), p.base_target);
        let mid = p.target(16.0);
        assert!(mid > p.base_target && mid < p.base_target + p.fs_range);
    }

    #[test]
    fn additive_increase_about_ai_per_rtt() {
        let cfg = CcConfig::default();
        let mut cc = CongestionControl::new(&cfg);
        let rtt = rtt_with(10);
        let w0 = cc.cwnd();
        // One window's worth of ACKs at base RTT: +1 packet.
        for _ in 0..(w0 as u32) {
            cc.on_ack(&cfg, Instant::from_micros(1000), 1, Some(dur_nanos(Duration::from_micros(10))), None, &rtt);
        }
        let w1 = cc.cwnd();
        assert!((w1 - w0 - 1.0).abs() < 0.05, "{w0} -> {w1}");
    }

    #[test]
    fn decrease_proportional_to_excess_once_per_rtt() {
        let p = SwiftParams { delay_floor: 1.0, ..SwiftParams::default() };
        let cfg = CcConfig::Swift(p);
        let mut cc = CongestionControl::new(&cfg);
        let base = Duration::from_micros(10);
        let target = p.target(cc.cwnd()).as_secs_f64();
        // Queueing delay of 2× target, standing for a whole round trip:
        // factor = 1 − 0.8 · ½ = 0.6.
        let queued = base + Duration::from_secs_f64(2.0 * target);
        let mut rtt = rtt_with(10);
        let now = Instant::from_micros(1000);
        rtt.sample(now, queued);
        cc.on_ack(&cfg, now, 1, Some(dur_nanos(queued)), None, &rtt);
        assert!((cc.cwnd() - 32.0 * 0.6).abs() < 1e-4, "{}", cc.cwnd());
        // A second overshoot within the same RTT does not decrease again.
        cc.on_ack(&cfg, now + Duration::from_micros(5), 1, Some(dur_nanos(queued)), None, &rtt);
        assert!((cc.cwnd() - 32.0 * 0.6).abs() < 1e-4);
        // Huge delay: capped at max_mdf.
        let mut cc2 = CongestionControl::new(&cfg);
        let mut rtt2 = rtt_with(10);
        let later = Instant::from_micros(20_000);
        rtt2.sample(later, Duration::from_millis(10));
        cc2.on_ack(&cfg, later, 1, Some(dur_nanos(Duration::from_millis(10))), None, &rtt2);
        assert!((cc2.cwnd() - 16.0).abs() < 1e-4);
    }

    #[test]
    fn delay_alone_stops_at_the_floor_loss_goes_below() {
        let cfg = CcConfig::default();
        let mut cc = CongestionControl::new(&cfg);
        let mut rtt = rtt_with(10);
        let mut now = Instant::from_micros(1000);
        // Standing delay far above target, round after round: the window stops at 32.
        for _ in 0..20 {
            now += Duration::from_millis(1);
            rtt.sample(now, Duration::from_millis(5));
            cc.on_ack(&cfg, now, 1, Some(dur_nanos(Duration::from_millis(5))), None, &rtt);
        }
        assert_eq!(cc.window(), 32, "{}", cc.cwnd());
        // A loss takes it lower.
        now += Duration::from_millis(10);
        cc.on_fast_recovery(&cfg, now, &rtt);
        assert_eq!(cc.window(), 16);
        // Below the floor the same delay does not stop it growing back: about a packet per
        // window of acknowledgements, as loss-based AIMD, up to the floor.
        let mut acked = 0;
        while cc.window() < 32 {
            now += Duration::from_millis(1);
            rtt.sample(now, Duration::from_millis(5));
            cc.on_ack(&cfg, now, 1, Some(dur_nanos(Duration::from_millis(5))), None, &rtt);
            acked += 1;
            assert!(acked < 1000, "stuck at {}", cc.cwnd());
        }
        assert!((350..=400).contains(&acked), "16 to 32 packets after {acked} acknowledgements");
        // At the floor delay holds it again.
        for _ in 0..100 {
            now += Duration::from_millis(1);
            rtt.sample(now, Duration::from_millis(5));
            cc.on_ack(&cfg, now, 1, Some(dur_nanos(Duration::from_millis(5))), None, &rtt);
        }
        assert_eq!(cc.window(), 32, "{}", cc.cwnd());
    }

    #[test]
    fn a_spike_within_the_round_trip_is_filtered() {
        // One late sample among prompt ones (a peer scheduled late) is not queueing.
        let cfg = CcConfig::default();
        let mut cc = CongestionControl::new(&cfg);
        let mut rtt = RttEstimator::new();
        let t0 = Instant::from_micros(1000);
        rtt.sample(t0, Duration::from_micros(10));
        rtt.sample(t0 + Duration::from_micros(5), Duration::from_millis(2));
        cc.on_ack(&cfg, t0 + Duration::from_micros(5), 1, Some(dur_nanos(Duration::from_millis(2))), None, &rtt);
        assert!(cc.cwnd() >= 32.0, "{}", cc.cwnd());
        // Undo restores a window cut by a timeout found spurious.
        cc.on_timeout(&cfg, t0 + Duration::from_millis(1), &rtt);
        assert!(cc.cwnd() < 32.0);
        cc.undo_timeout(32.03);
        assert!(cc.cwnd() >= 32.0);
    }

    #[test]
    fn timeouts_reset_to_floor() {
        let cfg = CcConfig::default();
        let mut cc = CongestionControl::new(&cfg);
        let rtt = rtt_with(10);
        let mut now = Instant::from_micros(1000);
        for _ in 0..3 {
            now += Duration::from_millis(1);
            cc.on_timeout(&cfg, now, &rtt);
        }
        assert_eq!(cc.window(), 1);
        // Fixed never changes.
        let mut f = CongestionControl::new(&CcConfig::ORIGINAL);
        f.on_timeout(&CcConfig::ORIGINAL, now, &rtt);
        f.on_ack(&CcConfig::ORIGINAL, now, 5, Some(dur_nanos(Duration::from_secs(1))), None, &rtt);
        assert_eq!(f.window(), 32);
    }
}
