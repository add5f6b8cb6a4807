//! Receive-pool admission: keeps flows that share one pool of receive buffers from
//! deadlocking in reassembly.
//!
//! A flow holds a message's buffers from its first packet until the message is delivered and
//! read. If several flows of one pool each hold part of a large message and the pool runs
//! out, none can finish. The rule that prevents it: while more than `reserve` buffers are free
//! any flow may take one; at or below it only one flow, the *priority* flow, may (the first to
//! ask once the pool is that low), until it delivers a message or is freed. Every other flow
//! took its buffers while more than `reserve` were free, so once the application has read what
//! was delivered at least `reserve` buffers are left for the priority flow's message, and with
//! `reserve` ≥ the buffers of the largest message it always completes. A packet that completes
//! a message (the next one expected, carrying the last fragment) is admitted whenever a buffer
//! is free: it turns a partial message into a delivered one, whose buffers come back when the
//! application reads it, so it never adds to what partial messages hold. Packets refused here are
//! dropped unacknowledged (except the next one expected, whose acknowledgement keeps the
//! sender from declaring the flow dead) and retransmitted later.

use crate::FlowId;

/// Admission state of one receive pool (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxAdmission {
    prio: Option<FlowId>,
    reserve: usize,
}

impl RxAdmission {
    /// For a pool of `pool` buffers of `buf_size` bytes receiving messages of up to
    /// `max_message` bytes. The reserve is one largest message, at most half the pool (a
    /// smaller pool guarantees progress only for messages of up to half its size).
    pub fn new(pool: usize, buf_size: usize, max_message: usize) -> Self {
        let largest = max_message.div_ceil(buf_size.max(1));
        RxAdmission { prio: None, reserve: largest.min(pool / 2) }
    }

    /// Free buffers below which only the priority flow may take one.
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// The priority flow, if the pool ran low.
    pub fn priority(&self) -> Option<FlowId> {
        self.prio
    }

    /// Whether `flow` may take one of the `free` buffers left for a packet that `completes` a
    /// message (or not).
    #[inline]
    pub fn admit(&mut self, flow: FlowId, free: usize, completes: bool) -> bool {
        if free > self.reserve || (completes && free > 0) {
            return true;
        }
        match self.prio {
            Some(p) => p == flow && free > 0,
            None if free > 0 => {
                self.prio = Some(flow);
                true
            }
            None => false,
        }
    }

    /// `flow` delivered a message (or was freed): it is no longer the priority flow.
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

    #[test]
    fn reserve_is_one_largest_message_at_most_half_the_pool() {
        assert_eq!(RxAdmission::new(12288, 1418, 8 << 20).reserve(), 5916);
        assert_eq!(RxAdmission::new(1024, 1418, 8 << 20).reserve(), 512);
        assert_eq!(RxAdmission::new(1024, 1418, 100_000).reserve(), 71);
    }

    #[test]
    fn below_the_reserve_one_flow_at_a_time() {
        let mut a = RxAdmission::new(100, 1000, 10_000); // reserve 10
        assert!(a.admit(f(1), 11, false) && a.admit(f(2), 11, false), "above the reserve: everyone");
        assert_eq!(a.priority(), None);
        assert!(a.admit(f(2), 10, false), "the first to ask at the reserve becomes the priority flow");
        assert_eq!(a.priority(), Some(f(2)));
        assert!(!a.admit(f(1), 10, false) && !a.admit(f(1), 1, false), "others wait");
        assert!(a.admit(f(1), 1, true), "... unless the packet completes a message");
        assert!(a.admit(f(2), 1, false));
        assert!(!a.admit(f(2), 0, false) && !a.admit(f(1), 0, true), "nothing left");
        a.release(f(1));
        assert_eq!(a.priority(), Some(f(2)), "only the priority flow's own release counts");
        a.release(f(2));
        assert!(a.admit(f(1), 5, false), "then the next to ask");
        assert_eq!(a.priority(), Some(f(1)));
        assert!(!a.admit(f(3), 0, false));
    }
}
