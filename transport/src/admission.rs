//! Receive-pool admission: keeps flows that share one pool of receive buffers from
//! deadlocking in reassembly.
//!
//! A flow holds a message's buffers from its first packet until the message is delivered and
//! read. If several flows of one pool each hold part of a large message and the pool runs
//! out, none can finish. The rule that prevents it: while more than `reserve` buffers are free
//! any flow may take one; at or below it only one flow, the *priority* flow, may (the first to
//! ask once the pool is that low), until it holds no buffer (it delivered its last message
//! with nothing else held, or it was freed). Every other flow took its buffers while more than
//! `reserve` were free, so once the application has read what was delivered at least `reserve`
//! buffers are left for the priority flow's message, and with `reserve` ≥ the buffers of the
//! largest message it always completes. When the priority flow itself finds nothing free, its
//! highest out-of-order packet is given up (reneged) to store the lower one it needs.
//!
//! A packet that completes a message (the next one expected, carrying the last fragment) is
//! admitted whenever a buffer is free: it turns a partial message into a delivered one, whose
//! buffers come back when the application reads it, so it never adds to what partial messages
//! hold. Packets refused here are dropped unacknowledged (except the next one expected, whose
//! acknowledgement keeps the sender from declaring the flow dead) and retransmitted later.
//!
//! A priority flow whose sender went quiet (no packet for [`STALE`]; a live sender that
//! waits for buffers still probes every `rto_max`) would hold the priority forever, since a
//! receiving flow has no timer of its own: the next flow to ask takes it over. What the quiet
//! flow holds stays held until it is closed, so after a takeover the guarantee covers messages
//! up to the reserve minus that; a vanished sender is the one case this rule only mitigates.

use core::time::Duration;

use crate::FlowId;
use machnet_net::time::Instant;

/// How long a priority flow may go without asking for a buffer before another flow takes the
/// priority over (ten times the default `rto_max`).
pub const STALE: Duration = Duration::from_secs(1);

/// Admission state of one receive pool (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxAdmission {
    prio: Option<FlowId>,
    /// When the priority flow last asked.
    prio_seen: Instant,
    reserve: usize,
}

impl RxAdmission {
    /// For a pool of `pool` buffers of `buf_size` bytes receiving messages of up to
    /// `max_message` bytes. The reserve is one largest message, at most half the pool (a
    /// smaller pool guarantees progress only for messages of up to half its size).
    pub fn new(pool: usize, buf_size: usize, max_message: usize) -> Self {
        let largest = max_message.div_ceil(buf_size.max(1));
        RxAdmission { prio: None, prio_seen: Instant::ZERO, reserve: largest.min(pool / 2) }
    }

    /// Free buffers below which only the priority flow may take one.
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// The priority flow, if the pool ran low.
    pub fn priority(&self) -> Option<FlowId> {
        self.prio
    }

    /// Whether `flow` may take one of the `free` buffers left, at `now`, for a packet that
    /// `completes` a message (or not).
    #[inline]
    pub fn admit(&mut self, flow: FlowId, free: usize, completes: bool, now: Instant) -> bool {
        if self.prio == Some(flow) {
            self.prio_seen = now;
            return free > 0;
        }
        if free > self.reserve || (completes && free > 0) {
            return true;
        }
        if free == 0 {
            return false;
        }
        match self.prio {
            Some(_) if now.saturating_since(self.prio_seen) < STALE => false,
            _ => {
                self.prio = Some(flow);
                self.prio_seen = now;
                true
            }
        }
    }

    /// `flow` holds no receive buffer any more: it is no longer the priority flow.
    #[inline]
    pub fn release(&mut self, flow: FlowId) {
        if self.prio == Some(flow) {
            self.prio = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(i: u32) -> FlowId {
        FlowId { index: i, gen: 0 }
    }

    fn ms(x: u64) -> Instant {
        Instant::from_micros(x * 1000)
    }

    #[test]
    fn reserve_is_one_largest_message_at_most_half_the_pool() {
        assert_eq!(RxAdmission::new(12288, 1418, 8 << 20).reserve(), 5916);
        assert_eq!(RxAdmission::new(1024, 1418, 8 << 20).reserve(), 512);
        assert_eq!(RxAdmission::new(1024, 1418, 100_000).reserve(), 71);
    }

    #[test]
    fn below_the_reserve_one_flow_at_a_time() {
        let mut a = RxAdmission::new(100, 1000, 10_000); // reserve 10
        let t = ms(1);
        assert!(a.admit(f(1), 11, false, t) && a.admit(f(2), 11, false, t), "above the reserve: everyone");
        assert_eq!(a.priority(), None);
        assert!(a.admit(f(2), 10, false, t), "the first to ask at the reserve becomes the priority flow");
        assert_eq!(a.priority(), Some(f(2)));
        assert!(!a.admit(f(1), 10, false, t) && !a.admit(f(1), 1, false, t), "others wait");
        assert!(a.admit(f(1), 1, true, t), "... unless the packet completes a message");
        assert!(a.admit(f(2), 1, false, t));
        assert!(!a.admit(f(2), 0, false, t) && !a.admit(f(1), 0, true, t), "nothing left");
        a.release(f(1));
        assert_eq!(a.priority(), Some(f(2)), "only the priority flow's own release counts");
        a.release(f(2));
        assert!(a.admit(f(1), 5, false, t), "then the next to ask");
        assert_eq!(a.priority(), Some(f(1)));
        assert!(!a.admit(f(3), 0, false, t));
    }

    #[test]
    fn a_priority_flow_whose_sender_went_quiet_is_replaced() {
        let mut a = RxAdmission::new(100, 1000, 10_000);
        assert!(a.admit(f(1), 5, false, ms(0)));
        // Still asking (even with nothing free) every 100 ms: it keeps the priority.
        for k in 1..=20 {
            assert!(!a.admit(f(1), 0, false, ms(100 * k)));
            assert!(!a.admit(f(2), 5, false, ms(100 * k + 50)), "a live priority flow is not replaced");
        }
        // Silent for a second: the next to ask takes over.
        assert!(a.admit(f(2), 5, false, ms(2000 + 1000)));
        assert_eq!(a.priority(), Some(f(2)));
    }
}
