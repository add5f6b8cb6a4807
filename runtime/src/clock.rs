//! A cheap monotonic clock.
//!
//! Measured on this project's machine (KVM guest, AMD EPYC, invariant TSC): reading the TSC
//! costs 10–15 ns, `clock_gettime(CLOCK_MONOTONIC)` through the vDSO 23–36 ns. A shard reads
//! the clock once per loop iteration, so the TSC is used when the CPU reports an invariant TSC
//! (`constant_tsc` and `nonstop_tsc`), converted to nanoseconds with a multiplier calibrated
//! against `CLOCK_MONOTONIC` and re-anchored to it every second (so the two cannot drift apart,
//! and the result never goes backwards). Elsewhere the clock is `CLOCK_MONOTONIC` itself.

use machnet_net::time::Instant;
use std::time::Duration;

/// Which source a [`Clock`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The time-stamp counter, calibrated.
    Tsc,
    /// `clock_gettime(CLOCK_MONOTONIC)`.
    Monotonic,
}

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `clock_gettime` writes one `timespec` into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64; it only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn rdtsc() -> u64 {
    monotonic_ns()
}

fn invariant_tsc() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return false;
    }
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return false };
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    has("constant_tsc") && has("nonstop_tsc")
}

/// Fixed-point TSC → ns conversion: `ns = base_ns + ((tsc − base_tsc) · mult) >> 32`.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    base_tsc: u64,
    base_ns: u64,
    mult: u64,
}

/// A monotonic clock for one thread (each shard owns its own).
#[derive(Debug, Clone)]
pub struct Clock {
    source: Source,
    anchor: Anchor,
    last: u64,
    next_resync: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

const RESYNC_NS: u64 = 1_000_000_000;

impl Clock {
    /// The TSC where it is invariant, else `CLOCK_MONOTONIC`. Calibration takes ~10 ms.
    pub fn new() -> Self {
        if invariant_tsc() {
            Self::tsc(Duration::from_millis(10))
        } else {
            Self::monotonic()
        }
    }

    /// Always `CLOCK_MONOTONIC`.
    pub fn monotonic() -> Self {
        Clock {
            source: Source::Monotonic,
            anchor: Anchor { base_tsc: 0, base_ns: 0, mult: 0 },
            last: 0,
            next_resync: u64::MAX,
        }
    }

    /// The TSC, calibrated over `calibration` against `CLOCK_MONOTONIC`.
    pub fn tsc(calibration: Duration) -> Self {
        let (t0, n0) = (rdtsc(), monotonic_ns());
        std::thread::sleep(calibration);
        let (t1, n1) = (rdtsc(), monotonic_ns());
        let ticks = t1.wrapping_sub(t0).max(1);
        let mult = (((n1 - n0) as u128) << 32) / ticks as u128;
        let anchor = Anchor { base_tsc: t1, base_ns: n1, mult: mult as u64 };
        Clock { source: Source::Tsc, anchor, last: n1, next_resync: n1 + RESYNC_NS }
    }

    /// Which source this clock reads.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The current time, never earlier than the last reading.
    #[inline]
    pub fn now(&mut self) -> Instant {
        let ns = match self.source {
            Source::Monotonic => monotonic_ns(),
            Source::Tsc => {
                let a = self.anchor;
                let dt = rdtsc().wrapping_sub(a.base_tsc);
                let ns = a.base_ns + ((u128::from(dt) * u128::from(a.mult)) >> 32) as u64;
                if ns >= self.next_resync {
                    self.resync(ns)
                } else {
                    ns
                }
            }
        };
        self.last = self.last.max(ns);
        Instant(self.last)
    }

    /// Re-anchors to `CLOCK_MONOTONIC`, refining the rate from the interval since the last
    /// anchor.
    #[cold]
    fn resync(&mut self, tsc_ns: u64) -> u64 {
        let (t, n) = (rdtsc(), monotonic_ns());
        let a = self.anchor;
        let ticks = t.wrapping_sub(a.base_tsc);
        if ticks > 0 && n > a.base_ns {
            self.anchor.mult = ((((n - a.base_ns) as u128) << 32) / ticks as u128) as u64;
        }
        self.anchor.base_tsc = t;
        self.anchor.base_ns = n;
        self.next_resync = n + RESYNC_NS;
        n.max(tsc_ns.min(n + 1_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_monotonic_and_never_goes_back() {
        for mut c in [Clock::new(), Clock::monotonic(), Clock::tsc(Duration::from_millis(5))] {
            let mut prev = c.now();
            let start_mono = monotonic_ns();
            let start = c.now();
            for _ in 0..100_000 {
                let t = c.now();
                assert!(t >= prev);
                prev = t;
            }
            std::thread::sleep(Duration::from_millis(20));
            let elapsed_clock = c.now().as_nanos() - start.as_nanos();
            let elapsed_mono = monotonic_ns() - start_mono;
            let err = elapsed_clock.abs_diff(elapsed_mono);
            assert!(err < 2_000_000, "{:?} clock drifted {err} ns over {elapsed_mono} ns", c.source());
        }
    }
}
