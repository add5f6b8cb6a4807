//! What the transport needs from its environment.

use crate::{Event, FlowId, FlowTuple, InMsg, Owner, Seg};
use machnet_net::time::Instant;
use machnet_net::wire::{FrameRepr, MsgFlags};

/// The environment of an [`Endpoint`](crate::Endpoint): payload storage, delivery, transmit,
/// timers and events. Every method is called from the endpoint's (single) thread.
///
/// Segments are addressed by `(owner, seg)`. Transmit segments come from the application (the
/// endpoint only reads their metadata and releases them when acknowledged); receive segments
/// are allocated here for arriving payloads and either delivered as part of a message or freed.
pub trait Env {
    // --- receive side ---

    /// Stores a received payload for a flow of `owner` in a new segment. `None` when no buffer
    /// is available: the packet is dropped without acknowledgement and will be retransmitted.
    fn alloc_rx(&mut self, owner: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg>;
    /// Whether `flow` may store a received packet now (asked before
    /// [`alloc_rx`](Self::alloc_rx)); `completes`: the packet is the next one expected and
    /// carries a message's last fragment. `false` drops it as if no buffer were free. For pools
    /// shared by several flows, see [`RxAdmission`](crate::RxAdmission). Default: always.
    fn admit_rx(&mut self, owner: Owner, flow: FlowId, completes: bool, now: Instant) -> bool {
        let _ = (owner, flow, completes, now);
        true
    }
    /// `flow` of `owner` holds no receive buffer any more: it delivered its last message with
    /// nothing else held, or it is gone (closed, reset or failed) and its buffers were freed.
    fn rx_released(&mut self, owner: Owner, flow: FlowId) {
        let _ = (owner, flow);
    }
    /// Appends `next` after `prev` in a message being reassembled.
    fn link_rx(&mut self, owner: Owner, prev: Seg, next: Seg);
    /// Releases a received segment that will not be delivered.
    fn free_rx(&mut self, owner: Owner, seg: Seg);
    /// Releases a whole reassembled chain of `count` segments from `head` (linked by `link_rx`).
    fn free_rx_chain(&mut self, owner: Owner, head: Seg, count: u32);
    /// Hands a complete message to `owner`. `false` means "not now" (the application's ring is
    /// full): nothing changed, the endpoint keeps the message and retries on a later
    /// [`flush`](crate::Endpoint::flush).
    fn deliver(&mut self, owner: Owner, flow: FlowId, tuple: &FlowTuple, msg: &InMsg) -> bool;

    // --- transmit side ---

    /// Length and fragment flags of a transmit segment.
    fn tx_meta(&self, owner: Owner, seg: Seg) -> (usize, MsgFlags);
    /// The segment after `seg` in a transmit chain.
    fn tx_next(&self, owner: Owner, seg: Seg) -> Option<Seg>;
    /// Links `next` after `prev` (the tail of one queued message to the head of the next).
    fn tx_link(&mut self, owner: Owner, prev: Seg, next: Seg);
    /// Releases an acknowledged (or abandoned) transmit segment back to its owner.
    fn free_tx(&mut self, owner: Owner, seg: Seg);

    /// Sends one frame: `frame`'s headers followed by the payload of `payload` (a transmit
    /// segment of `owner`), if any. `false` means no transmit buffer is available now; the
    /// endpoint retries later.
    fn transmit(&mut self, owner: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool;

    // --- timers and events ---

    /// Arms (or with `None`, cancels) the flow's single timer. When it fires, call
    /// [`on_timer`](crate::Endpoint::on_timer). A later call replaces the earlier deadline.
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>);
    /// Tells `owner` something happened.
    fn event(&mut self, owner: Owner, event: Event);
}
