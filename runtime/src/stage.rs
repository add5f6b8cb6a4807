//! Stages and their counters.

use machnet_net::time::Instant;

/// Work a stage did in one poll: packets, messages, timers… Zero means it found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Work(pub u32);

impl Work {
    /// Nothing done.
    pub const IDLE: Work = Work(0);
    /// True if nothing was done.
    pub fn is_idle(self) -> bool {
        self.0 == 0
    }
}

impl core::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work(self.0.saturating_add(o.0))
    }
}

impl core::ops::AddAssign for Work {
    fn add_assign(&mut self, o: Work) {
        *self = *self + o;
    }
}

/// A pollable stage of a shard's pipeline, over a context `C` the pipeline shares between
/// its stages.
pub trait Stage<C> {
    /// Does whatever is ready, without blocking, and says how much.
    fn poll(&mut self, now: Instant, ctx: &mut C) -> Work;
}

/// Counters of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageStats {
    /// Polls.
    pub polls: u64,
    /// Polls that did work.
    pub busy_polls: u64,
    /// Work items.
    pub work: u64,
    /// Nanoseconds spent in polls that did work.
    pub busy_ns: u64,
    /// Nanoseconds spent in polls that found nothing.
    pub idle_ns: u64,
    /// Polls longer than the stall threshold.
    pub stalls: u64,
    /// The longest poll, in nanoseconds.
    pub max_poll_ns: u64,
}
