//! The engine side of a channel. It trusts nothing in the shared region.
//!
//! An [`EngineChannel`] creates the region, keeps a private [`Layout`] (it never reads the
//! header back), a private ownership table per pool and private copies of every buffer chain
//! it accepted. The application can scribble over the whole region at any time: the worst it
//! can achieve is breaking its own channel.
//!
//! # Data path
//!
//! * TX (app → engine): [`EngineChannel::poll_tx`] takes one message descriptor, validates it
//!   completely, copies its chain into private arrays and marks its buffers engine-owned; the
//!   caller then reads the payload with [`EngineChannel::read_seg`] and, once the peer
//!   acknowledged a buffer, gives it back with [`EngineChannel::free_tx`]. A message the daemon
//!   refuses (flow not owned) goes back whole with [`EngineChannel::refuse_tx`].
//! * RX (engine → app): [`EngineChannel::alloc_rx`] copies a packet payload into a buffer of the
//!   engine's private free list, [`EngineChannel::link_rx`] chains buffers, and
//!   [`EngineChannel::deliver`] publishes the message — or answers [`DeliverError::Full`] and
//!   changes nothing when the application's RX ring is full (back-pressure).
//! * Control: [`EngineChannel::poll_ctrl`] yields requests, [`EngineChannel::complete`] answers
//!   them, [`EngineChannel::post_event`] reports unsolicited events.
//! * Call [`EngineChannel::flush`] at the end of every poll round: it publishes returned TX
//!   buffers in one batch, drains the completion overflow queue, and rings the application's
//!   doorbell if it sleeps while messages were delivered.
//!
//! Nothing here allocates after [`EngineChannel::create`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

use crate::layout::{
    ChannelConfig, CtrlEntry, Layout, MachnetFlow, MsgDesc, Part, MSG_FLAGS_ACCEPTED, MSG_MAX_LEN, NIL, STATE_DEAD,
};
use crate::ops::{Completion, CtrlOp, Event, EventKind, Status};
use crate::pool::{FreeList, Owner, OwnerTable};
use crate::region::{set, Region};
use crate::ring::{Consumer, Corrupt, Producer};
use crate::shm;

/// TX descriptors taken from the ring at once.
const TX_BATCH: usize = 32;
/// How many freed TX buffers are batched before they are published.
const TX_RET_BATCH: usize = 64;
/// Completions and events kept privately while the CQ is full.
const CQ_OVERFLOW: usize = 256;
/// RX-return entries read per refill.
const RX_REFILL_BATCH: usize = 64;

/// A protocol violation by the application. Counted per reason; never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// A ring index the application publishes moved backwards or beyond the ring. The ring
    /// (and so the channel) is poisoned: the engine stops reading it.
    RingIndex,
    /// Message length 0 or above [`MSG_MAX_LEN`], or a buffer count that does not match it.
    MsgLength,
    /// A buffer index outside the pool.
    BufIndex,
    /// A buffer the application does not hold (already submitted, engine-held, or a cycle).
    BufOwner,
    /// A buffer length other than `mss` (all but the last) or the remainder (the last).
    SegLength,
    /// A returned RX buffer that is out of range or not held by the application.
    ReturnedBuf,
    /// An unknown control opcode or a request with id 0.
    CtrlRequest,
}

impl Violation {
    /// Number of reasons.
    pub const COUNT: usize = 7;
    /// All reasons, in [`EngineStats::violations`] order.
    pub const ALL: [Violation; Violation::COUNT] = [
        Violation::RingIndex,
        Violation::MsgLength,
        Violation::BufIndex,
        Violation::BufOwner,
        Violation::SegLength,
        Violation::ReturnedBuf,
        Violation::CtrlRequest,
    ];

    /// Code carried in [`EventKind::Violation`] events.
    pub const fn code(self) -> u32 {
        self as u32 + 1
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::RingIndex => "ring index out of range",
            Violation::MsgLength => "bad message length or buffer count",
            Violation::BufIndex => "buffer index out of range",
            Violation::BufOwner => "buffer not owned by the application",
            Violation::SegLength => "bad buffer length",
            Violation::ReturnedBuf => "returned buffer not owned by the application",
            Violation::CtrlRequest => "bad control request",
        })
    }
}

/// A message accepted from the TX ring. Its buffers are engine-owned until freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxMsg {
    /// The flow the application sends on (src = local).
    pub flow: MachnetFlow,
    /// First buffer; walk the chain with [`EngineChannel::seg_next`].
    pub head: u32,
    /// Buffers in the chain.
    pub count: u32,
    /// Total bytes.
    pub len: u32,
    /// Accepted `MSG_FLAG_*` bits.
    pub flags: u32,
}

/// A control request from the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlRequest {
    /// Request id, to pass to [`EngineChannel::complete`].
    pub id: u64,
    /// What is asked.
    pub op: CtrlOp,
}

/// Why [`EngineChannel::deliver`] did not deliver. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverError {
    /// The application's RX ring is full: try again later (back-pressure).
    Full,
    /// The chain is not a chain of `count` engine-held RX buffers totalling `len` (a caller bug).
    BadChain,
}

impl fmt::Display for DeliverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeliverError::Full => "receive ring full",
            DeliverError::BadChain => "invalid buffer chain",
        })
    }
}

/// The completion queue and its private overflow are full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("queue full")
    }
}

/// Buffer accounting and counters of one channel. Buffer counts always sum to the pool sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// TX pool size.
    pub tx_bufs: u32,
    /// TX buffers held by the application (free at the app, or queued on the TX ring).
    pub tx_app: u32,
    /// TX buffers held by the engine (accepted, not yet acknowledged).
    pub tx_engine: u32,
    /// TX buffers freed by the engine, not yet published back.
    pub tx_returning: u32,
    /// TX buffers reclaimed after the application went away.
    pub tx_reclaimed: u32,
    /// RX pool size.
    pub rx_bufs: u32,
    /// RX buffers free at the engine (including returned ones not yet read back).
    pub rx_free: u32,
    /// RX buffers being assembled by the engine.
    pub rx_engine: u32,
    /// RX buffers delivered to the application and not yet returned.
    pub rx_app: u32,
    /// Messages accepted from the TX ring.
    pub tx_msgs: u64,
    /// Bytes accepted from the TX ring.
    pub tx_bytes: u64,
    /// Messages delivered.
    pub rx_msgs: u64,
    /// Bytes delivered.
    pub rx_bytes: u64,
    /// Deliveries refused for a full RX ring.
    pub rx_full: u64,
    /// Messages refused through [`EngineChannel::refuse_tx`].
    pub refused: u64,
    /// Events dropped because the CQ and its overflow were full.
    pub events_dropped: u64,
    /// Times the application's doorbell was rung (it slept while messages arrived).
    pub doorbells: u64,
    /// Engine-side API misuse detected (freeing a buffer the engine does not hold, ...).
    pub misuse: u64,
    /// Violations by reason, in [`Violation::ALL`] order.
    pub violations: [u64; Violation::COUNT],
}

impl EngineStats {
    /// All violations.
    pub fn violations_total(&self) -> u64 {
        self.violations.iter().sum()
    }
}

/// What [`EngineChannel::reclaim_all`] found and took back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaim {
    /// TX buffers the application held.
    pub tx_app: u32,
    /// TX buffers the engine held (messages in flight) or was returning.
    pub tx_engine: u32,
    /// RX buffers the application held (delivered, unread or unreturned).
    pub rx_app: u32,
    /// RX buffers the engine held (partly assembled) or had free.
    pub rx_engine: u32,
}

/// Descriptors handed to the application side of a new channel (send them with `SCM_RIGHTS`).
#[derive(Debug)]
pub struct AppFds {
    /// The sealed memfd of the region.
    pub memfd: OwnedFd,
    /// Engine → app doorbell (the app waits on it).
    pub app_bell: OwnedFd,
    /// App → engine doorbell (the app rings it).
    pub engine_bell: OwnedFd,
}

/// The engine end of one channel.
pub struct EngineChannel {
    region: Region,
    memfd: OwnedFd,
    app_bell: OwnedFd,
    engine_bell: OwnedFd,
    huge: bool,
    tx_ring: Consumer<MsgDesc>,
    /// Descriptors taken from the TX ring (private copies), served one by one by `poll_tx`.
    tx_batch: [MsgDesc; TX_BATCH],
    tx_batch_len: u8,
    tx_batch_pos: u8,
    rx_ring: Producer<MsgDesc>,
    tx_ret: Producer<u32>,
    rx_ret: Consumer<u32>,
    sq: Consumer<CtrlEntry>,
    cq: Producer<CtrlEntry>,
    tx_own: OwnerTable,
    tx_next: Box<[u32]>,
    tx_len: Box<[u32]>,
    tx_ret_pending: FreeList,
    rx_own: OwnerTable,
    rx_next: Box<[u32]>,
    rx_len: Box<[u32]>,
    rx_free: FreeList,
    cq_overflow: VecDeque<CtrlEntry>,
    /// A ring the app produces into or consumes from was corrupted: stop reading it.
    poisoned: bool,
    dead: bool,
    /// App sleep sequence number last rung, so each sleep is rung at most once.
    app_rung: u32,
    /// Messages were delivered since the last doorbell check.
    wake_pending: bool,
    /// TX buffers were returned or TX-ring slots freed since the last doorbell check (rung for
    /// only if the application waits for transmit room: `want_tx`).
    tx_progress: bool,
    stats: EngineStats,
}

impl fmt::Debug for EngineChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineChannel")
            .field("name", &self.region.name())
            .field("layout", &self.region.lay)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl EngineChannel {
    /// Creates a channel region (sealed memfd, hugepages if `try_huge` and available), its two
    /// doorbells, and initialises everything. Returns the engine end and the descriptors for
    /// the application.
    pub fn create(cfg: &ChannelConfig, name: &str, try_huge: bool) -> io::Result<(EngineChannel, AppFds)> {
        let lay = Layout::compute(cfg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let sealed = shm::create_sealed(name, lay.total_len, try_huge)?;
        let region = Region::new(sealed.map, lay);
        region.init_header(name, true);
        let app_bell = shm::eventfd()?;
        let engine_bell = shm::eventfd()?;
        let fds = AppFds {
            memfd: sealed.fd.try_clone()?,
            app_bell: app_bell.try_clone()?,
            engine_bell: engine_bell.try_clone()?,
        };
        let n_tx = cfg.tx_bufs;
        let n_rx = cfg.rx_bufs;
        // SAFETY: each ring part is laid out for its element type and entry count; the handles
        // have no drop glue and live in the same struct as the mapping, so they never outlive
        // it; this engine holds the only engine-side handles of this region.
        let (tx_ring, rx_ring, tx_ret, rx_ret, sq, cq) = unsafe {
            (
                region.consumer::<MsgDesc>(Part::TxRing, cfg.tx_ring),
                region.producer::<MsgDesc>(Part::RxRing, cfg.rx_ring),
                region.producer::<u32>(Part::TxRetRing, lay.tx_ret_ring),
                region.consumer::<u32>(Part::RxRetRing, lay.rx_ret_ring),
                region.consumer::<CtrlEntry>(Part::Sq, cfg.ctrl_ring),
                region.producer::<CtrlEntry>(Part::Cq, cfg.ctrl_ring),
            )
        };
        let ch = EngineChannel {
            region,
            memfd: sealed.fd,
            app_bell,
            engine_bell,
            huge: sealed.huge,
            tx_ring,
            tx_batch: [MsgDesc::default(); TX_BATCH],
            tx_batch_len: 0,
            tx_batch_pos: 0,
            rx_ring,
            tx_ret,
            rx_ret,
            sq,
            cq,
            tx_own: OwnerTable::new(n_tx, Owner::App),
            tx_next: vec![NIL; n_tx as usize].into_boxed_slice(),
            tx_len: vec![0; n_tx as usize].into_boxed_slice(),
            tx_ret_pending: FreeList::with_capacity(n_tx as usize),
            rx_own: OwnerTable::new(n_rx, Owner::Free),
            rx_next: vec![NIL; n_rx as usize].into_boxed_slice(),
            rx_len: vec![0; n_rx as usize].into_boxed_slice(),
            rx_free: FreeList::full(n_rx),
            cq_overflow: VecDeque::with_capacity(CQ_OVERFLOW),
            poisoned: false,
            dead: false,
            app_rung: 0,
            wake_pending: false,
            tx_progress: false,
            stats: EngineStats { tx_bufs: n_tx, rx_bufs: n_rx, ..Default::default() },
        };
        Ok((ch, fds))
    }

    /// Duplicates the descriptors the application needs (for another hand-off).
    pub fn app_fds(&self) -> io::Result<AppFds> {
        Ok(AppFds {
            memfd: self.memfd.try_clone()?,
            app_bell: self.app_bell.try_clone()?,
            engine_bell: self.engine_bell.try_clone()?,
        })
    }

    /// The layout in force.
    pub fn layout(&self) -> &Layout {
        &self.region.lay
    }

    /// Payload bytes per buffer.
    pub fn mss(&self) -> usize {
        self.region.lay.cfg.mss as usize
    }

    /// Whether the region is backed by huge pages.
    pub fn is_hugepage_backed(&self) -> bool {
        self.huge
    }

    /// The memfd of the region.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The app → engine doorbell, readable when the application rang it (add it to the
    /// engine's epoll set for adaptive idling).
    pub fn engine_bell(&self) -> BorrowedFd<'_> {
        self.engine_bell.as_fd()
    }

    /// Whether a corrupted ring index made the engine stop reading this channel.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn violation(&mut self, v: Violation, aux: u32) {
        self.stats.violations[v as usize] += 1;
        if v == Violation::RingIndex {
            self.poisoned = true;
        }
        let ev = Event { kind: EventKind::Violation, flow: MachnetFlow::default(), status: Status::BadRequest, aux };
        let mut e = ev.encode();
        e.status = v.code();
        if self.push_cq(e).is_err() {
            self.stats.events_dropped += 1;
        }
    }

    // --- TX path --------------------------------------------------------------------------

    /// Takes the next message from the TX ring. `None` when there is none (or the channel is
    /// poisoned/dead). A bad message is consumed, counted, reported to the application as a
    /// [`EventKind::Violation`] event, and returned as `Err`; its buffers stay with the app.
    pub fn poll_tx(&mut self) -> Option<Result<TxMsg, Violation>> {
        if self.poisoned || self.dead {
            return None;
        }
        if self.tx_batch_pos == self.tx_batch_len {
            // Take up to a batch of descriptors at once and release their slots with one store:
            // a per-message release would bounce the consumer-index line whenever the
            // application polls it on a full ring.
            match self.tx_ring.read_batch(&mut self.tx_batch) {
                Ok(0) => return None,
                Ok(n) => {
                    self.tx_ring.release();
                    self.tx_progress = true;
                    self.tx_batch_len = n as u8;
                    self.tx_batch_pos = 0;
                }
                Err(Corrupt) => {
                    self.violation(Violation::RingIndex, 0);
                    return Some(Err(Violation::RingIndex));
                }
            }
        }
        let d = self.tx_batch[self.tx_batch_pos as usize];
        self.tx_batch_pos += 1;
        Some(self.accept_tx(d))
    }

    fn accept_tx(&mut self, d: MsgDesc) -> Result<TxMsg, Violation> {
        let len = d.len as usize;
        let mss = self.mss();
        if len == 0 || len > MSG_MAX_LEN || d.count as usize != len.div_ceil(mss) {
            self.violation(Violation::MsgLength, d.head);
            return Err(Violation::MsgLength);
        }
        let count = d.count;
        let last_len = (len - (count as usize - 1) * mss) as u32;
        let mut idx = d.head;
        let mut taken = 0u32;
        // Each step moves one distinct buffer App → Engine, so the walk ends after at most
        // `count` steps and a cycle shows up as BufOwner.
        let bad = loop {
            if idx >= self.region.lay.cfg.tx_bufs {
                break Some((Violation::BufIndex, idx));
            }
            if !self.tx_own.transition(idx, Owner::App, Owner::Engine) {
                break Some((Violation::BufOwner, idx));
            }
            taken += 1;
            if count == 1 {
                // A single-buffer message is described by its descriptor alone.
                self.tx_len[idx as usize] = last_len;
                self.tx_next[idx as usize] = NIL;
                break None;
            }
            let h = self.region.buf_hdr(Part::TxPool, idx);
            let seg = h.len.load(Ordering::Relaxed);
            let want = if taken == count { last_len } else { mss as u32 };
            if seg != want {
                break Some((Violation::SegLength, idx));
            }
            self.tx_len[idx as usize] = seg;
            if taken == count {
                self.tx_next[idx as usize] = NIL;
                break None;
            }
            let next = h.next.load(Ordering::Relaxed);
            self.tx_next[idx as usize] = next;
            idx = next;
        };
        if let Some((v, at)) = bad {
            // Give back what this walk took: the first `taken` buffers, linked privately.
            let mut i = d.head;
            for k in 0..taken {
                let ok = self.tx_own.transition(i, Owner::Engine, Owner::App);
                debug_assert!(ok);
                if k + 1 < taken {
                    i = self.tx_next[i as usize];
                }
            }
            self.violation(v, at);
            return Err(v);
        }
        self.stats.tx_msgs += 1;
        self.stats.tx_bytes += len as u64;
        Ok(TxMsg { flow: d.flow, head: d.head, count, len: d.len, flags: d.flags & MSG_FLAGS_ACCEPTED })
    }

    /// Payload bytes of engine-held TX buffer `idx` (0 if the engine does not hold it).
    #[inline]
    pub fn seg_len(&self, idx: u32) -> usize {
        match self.tx_own.get(idx) {
            Some(Owner::Engine) => self.tx_len[idx as usize] as usize,
            _ => 0,
        }
    }

    /// The buffer after engine-held TX buffer `idx` in its message, from the engine's private
    /// copy of the chain.
    #[inline]
    pub fn seg_next(&self, idx: u32) -> Option<u32> {
        match self.tx_own.get(idx) {
            Some(Owner::Engine) => Some(self.tx_next[idx as usize]).filter(|&n| n != NIL),
            _ => None,
        }
    }

    /// Copies the payload of engine-held TX buffer `idx` into `dst`; returns the bytes copied
    /// (`min(seg_len, dst.len())`, 0 if the engine does not hold `idx`).
    ///
    /// The application may be writing those bytes concurrently (a buggy or hostile one): the
    /// copy is done from raw pointers and yields whatever bytes were there, never UB.
    #[inline]
    pub fn read_seg(&self, idx: u32, dst: &mut [u8]) -> usize {
        self.read_seg_at(idx, 0, dst)
    }

    /// As [`EngineChannel::read_seg`], starting `offset` bytes into the buffer.
    #[inline]
    pub fn read_seg_at(&self, idx: u32, offset: usize, dst: &mut [u8]) -> usize {
        let len = self.seg_len(idx);
        if offset >= len {
            return 0;
        }
        let n = (len - offset).min(dst.len());
        // SAFETY: idx is engine-held, so in range; offset + n <= len <= mss, inside the slot's
        // payload. The source is shared memory that may change under us: it is read through a
        // raw pointer into our private `dst` (no reference to shared bytes is formed), and any
        // byte value is a valid u8.
        unsafe {
            core::ptr::copy_nonoverlapping(self.region.payload(Part::TxPool, idx).add(offset), dst.as_mut_ptr(), n)
        };
        n
    }

    /// Gives TX buffer `idx` back to the application (the peer acknowledged it). Batched:
    /// published by [`EngineChannel::flush`] or every 64 buffers. Returns false (and counts
    /// misuse) if the engine does not hold `idx`.
    #[inline]
    pub fn free_tx(&mut self, idx: u32) -> bool {
        if !self.tx_own.transition(idx, Owner::Engine, Owner::Returning) {
            self.stats.misuse += 1;
            return false;
        }
        // Cannot overflow: capacity = pool size, and a buffer is pending at most once
        // (it is in state Returning until published).
        let pushed = self.tx_ret_pending.push(idx);
        debug_assert!(pushed.is_ok());
        if self.tx_ret_pending.len() >= TX_RET_BATCH {
            self.publish_tx_returns();
        }
        true
    }

    /// Frees every buffer of an accepted message (walks the private chain from `head`).
    pub fn free_tx_chain(&mut self, head: u32) {
        let mut i = Some(head);
        while let Some(idx) = i {
            i = self.seg_next(idx);
            if !self.free_tx(idx) {
                break;
            }
        }
    }

    /// Refuses an accepted message (for example: its flow is not owned by this channel): all
    /// its buffers go back to the application and a [`EventKind::TxRefused`] event with
    /// `reason` tells it why. Nothing leaks.
    pub fn refuse_tx(&mut self, msg: &TxMsg, reason: Status) {
        self.free_tx_chain(msg.head);
        self.stats.refused += 1;
        self.post_event(Event { kind: EventKind::TxRefused, flow: msg.flow, status: reason, aux: msg.len });
    }

    fn publish_tx_returns(&mut self) {
        let len = self.tx_ret_pending.len();
        if len == 0 || self.poisoned {
            return;
        }
        // The return ring can hold the whole pool, so it is short only if the application
        // stopped consuming it (or corrupted its index); the rest then stays pending.
        let free = match self.tx_ret.free(len as u32) {
            Ok(f) => f as usize,
            Err(Corrupt) => {
                self.violation(Violation::RingIndex, 0);
                return;
            }
        };
        let n = free.min(len);
        let batch = self.tx_ret_pending.top(n);
        let written = self.tx_ret.write_batch(batch).unwrap_or(0);
        debug_assert_eq!(written, n);
        for &idx in &batch[..written] {
            let ok = self.tx_own.transition(idx, Owner::Returning, Owner::App);
            debug_assert!(ok);
        }
        self.tx_ret_pending.truncate(len - written);
        self.tx_ret.publish();
        self.tx_progress |= written > 0;
    }

    // --- RX path --------------------------------------------------------------------------

    /// Reads returned RX buffers from the application, validating each index.
    fn refill_rx(&mut self) {
        if self.poisoned || self.dead {
            return;
        }
        let mut batch = [0u32; RX_REFILL_BATCH];
        loop {
            let n = match self.rx_ret.read_batch(&mut batch) {
                Ok(n) => n,
                Err(Corrupt) => {
                    self.violation(Violation::RingIndex, 0);
                    return;
                }
            };
            self.rx_ret.release();
            for &idx in &batch[..n] {
                if self.rx_own.transition(idx, Owner::App, Owner::Free) {
                    let ok = self.rx_free.push(idx);
                    debug_assert!(ok.is_ok());
                } else {
                    self.violation(Violation::ReturnedBuf, idx);
                }
            }
            if n < batch.len() {
                return;
            }
        }
    }

    /// Whether a [`EngineChannel::deliver`] could find room in the application's receive
    /// ring now (after `Full`: whether retrying is worth it). A corrupted ring index reads as
    /// room, so that the retry reports the violation.
    pub fn can_deliver(&mut self) -> bool {
        !self.dead && !matches!(self.rx_ring.free(1), Ok(0))
    }

    /// Free RX buffers the engine knows of now, without reading back returns (cheap; see
    /// [`EngineChannel::rx_available`] for the up-to-date count).
    #[inline]
    pub fn rx_free_len(&self) -> usize {
        self.rx_free.len()
    }

    /// Free RX buffers, after reading back what the application returned.
    pub fn rx_available(&mut self) -> usize {
        self.refill_rx();
        self.rx_free.len()
    }

    /// Takes a free RX buffer and copies `payload` (at most `mss` bytes) into it. `None` when
    /// the pool is exhausted (drop the packet without acknowledging it) or `payload` is too long.
    #[inline]
    pub fn alloc_rx(&mut self, payload: &[u8]) -> Option<u32> {
        if payload.len() > self.mss() || self.dead {
            return None;
        }
        if self.rx_free.is_empty() {
            self.refill_rx();
        }
        let idx = self.rx_free.pop()?;
        let ok = self.rx_own.transition(idx, Owner::Free, Owner::Engine);
        debug_assert!(ok);
        // SAFETY: idx < rx_bufs (it came from the private free list) and payload.len() <= mss,
        // so the destination is inside the slot's payload; the source is private memory. The
        // destination is shared memory, written through a raw pointer only.
        unsafe {
            core::ptr::copy_nonoverlapping(payload.as_ptr(), self.region.payload(Part::RxPool, idx), payload.len())
        };
        self.rx_len[idx as usize] = payload.len() as u32;
        self.rx_next[idx as usize] = NIL;
        Some(idx)
    }

    /// Links RX buffer `next` after `prev` (both engine-held). Returns false otherwise.
    #[inline]
    pub fn link_rx(&mut self, prev: u32, next: u32) -> bool {
        if self.rx_own.get(prev) != Some(Owner::Engine) || self.rx_own.get(next) != Some(Owner::Engine) {
            self.stats.misuse += 1;
            return false;
        }
        self.rx_next[prev as usize] = next;
        true
    }

    /// Returns engine-held RX buffer `idx` to the free list without delivering it (links are
    /// not followed). Returns false if the engine does not hold it.
    #[inline]
    pub fn free_rx(&mut self, idx: u32) -> bool {
        if !self.rx_own.transition(idx, Owner::Engine, Owner::Free) {
            self.stats.misuse += 1;
            return false;
        }
        let ok = self.rx_free.push(idx);
        debug_assert!(ok.is_ok());
        true
    }

    /// Frees a chain of `count` engine-held RX buffers starting at `head`.
    pub fn free_rx_chain(&mut self, head: u32, count: u32) {
        let mut idx = head;
        for _ in 0..count {
            if self.rx_own.get(idx) != Some(Owner::Engine) {
                self.stats.misuse += 1;
                return;
            }
            let next = self.rx_next[idx as usize];
            self.free_rx(idx);
            idx = next;
        }
    }

    /// Delivers the message of `count` engine-held RX buffers starting at `head`, `len` bytes
    /// in total, received on `flow` (src = remote sender, dst = local). Rings the application's
    /// doorbell if it sleeps. On error nothing changes: with [`DeliverError::Full`] retry later.
    pub fn deliver(&mut self, flow: MachnetFlow, head: u32, count: u32, len: u32) -> Result<(), DeliverError> {
        if self.dead {
            return Err(DeliverError::Full);
        }
        if count == 0 || count > self.region.lay.cfg.rx_bufs || len == 0 || len as usize > MSG_MAX_LEN {
            return Err(DeliverError::BadChain);
        }
        // Check the chain first (private data only).
        let mut idx = head;
        let mut sum = 0u64;
        for k in 0..count {
            if self.rx_own.get(idx) != Some(Owner::Engine) {
                return Err(DeliverError::BadChain);
            }
            sum += self.rx_len[idx as usize] as u64;
            if k + 1 < count {
                idx = self.rx_next[idx as usize];
            }
        }
        if sum != len as u64 {
            return Err(DeliverError::BadChain);
        }
        match self.rx_ring.free(1) {
            Ok(0) => {
                self.stats.rx_full += 1;
                return Err(DeliverError::Full);
            }
            Ok(_) => {}
            Err(Corrupt) => {
                // The app corrupted its consumer index: it cannot receive any more.
                self.stats.rx_full += 1;
                self.violation(Violation::RingIndex, 0);
                return Err(DeliverError::Full);
            }
        }
        let mut idx = head;
        for k in 0..count {
            let next = if k + 1 < count { self.rx_next[idx as usize] } else { NIL };
            if count > 1 {
                // (A single-buffer message is described by its descriptor alone.)
                let h = self.region.buf_hdr(Part::RxPool, idx);
                h.next.store(next, Ordering::Relaxed);
                h.len.store(self.rx_len[idx as usize], Ordering::Relaxed);
            }
            let ok = self.rx_own.transition(idx, Owner::Engine, Owner::App);
            debug_assert!(ok);
            idx = next;
        }
        let ok = self.rx_ring.write(MsgDesc { flow, head, count, len, flags: 0, reserved: 0 });
        debug_assert_eq!(ok, Ok(true));
        self.rx_ring.publish();
        self.stats.rx_msgs += 1;
        self.stats.rx_bytes += len as u64;
        // The doorbell check is batched into `flush`.
        self.wake_pending = true;
        Ok(())
    }

    /// Rings the application's doorbell if it is asleep and has not been rung for this sleep.
    /// Called after a sequentially consistent publish or fence: either the app's re-check (after
    /// its SeqCst announcement) sees what was published, or this load sees the announcement.
    #[inline]
    fn wake_app(&mut self) {
        let seq = self.region.bells().app.word.load(Ordering::SeqCst);
        if seq & 1 == 1 && seq != self.app_rung {
            self.app_rung = seq;
            self.stats.doorbells += 1;
            shm::ring(self.app_bell.as_fd());
        }
    }

    // --- Control --------------------------------------------------------------------------

    fn push_cq(&mut self, e: CtrlEntry) -> Result<(), Full> {
        self.drain_cq_overflow();
        if self.cq_overflow.is_empty() {
            match self.cq.write(e) {
                Ok(true) => {
                    self.cq.publish_seqcst();
                    self.wake_app();
                    return Ok(());
                }
                Ok(false) => {}
                Err(Corrupt) => {
                    // Cannot report through the CQ itself; count and poison.
                    self.stats.violations[Violation::RingIndex as usize] += 1;
                    self.poisoned = true;
                }
            }
        }
        if self.cq_overflow.len() < CQ_OVERFLOW {
            self.cq_overflow.push_back(e);
            Ok(())
        } else {
            Err(Full)
        }
    }

    fn drain_cq_overflow(&mut self) {
        let mut wrote = false;
        while let Some(e) = self.cq_overflow.front().copied() {
            match self.cq.write(e) {
                Ok(true) => {
                    self.cq_overflow.pop_front();
                    wrote = true;
                }
                _ => break,
            }
        }
        if wrote {
            self.cq.publish_seqcst();
            self.wake_app();
        }
    }

    /// Takes the next control request. An unknown opcode is answered with
    /// [`Status::BadRequest`] right here, counted, and returned as `Err`.
    pub fn poll_ctrl(&mut self) -> Option<Result<CtrlRequest, Violation>> {
        self.drain_cq_overflow();
        if self.poisoned || self.dead {
            return None;
        }
        let e = match self.sq.pop() {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(Corrupt) => {
                self.violation(Violation::RingIndex, 0);
                return Some(Err(Violation::RingIndex));
            }
        };
        match CtrlOp::decode(&e) {
            Some(op) if e.id != 0 => Some(Ok(CtrlRequest { id: e.id, op })),
            _ => {
                if e.id != 0 {
                    self.push_cq(Completion::done(e.id, Err(Status::BadRequest))).ok();
                }
                self.violation(Violation::CtrlRequest, e.op);
                Some(Err(Violation::CtrlRequest))
            }
        }
    }

    /// Answers request `id`. `Err(Full)` only if the CQ and the private overflow are both full.
    pub fn complete(&mut self, id: u64, result: Result<MachnetFlow, Status>) -> Result<(), Full> {
        self.push_cq(Completion::done(id, result))
    }

    /// Posts an unsolicited event. Never blocks; dropped (and counted) only if the CQ and the
    /// overflow queue are both full.
    pub fn post_event(&mut self, ev: Event) {
        if self.push_cq(ev.encode()).is_err() {
            self.stats.events_dropped += 1;
        }
    }

    // --- Housekeeping ---------------------------------------------------------------------

    /// End of a poll round: publishes returned TX buffers, drains queued completions, and
    /// mirrors the counters into shared memory.
    pub fn flush(&mut self) {
        self.publish_tx_returns();
        self.drain_cq_overflow();
        let tx = std::mem::take(&mut self.tx_progress);
        if self.wake_pending || tx {
            let delivered = std::mem::take(&mut self.wake_pending);
            // After the fence either the application's re-check sees what was published, or
            // these loads see its announcement (sleep sequence and `want_tx`).
            std::sync::atomic::fence(Ordering::SeqCst);
            if delivered || self.region.bells().app.want_tx.load(Ordering::SeqCst) != 0 {
                self.wake_app();
            }
        }
        let c = &self.region.counters().engine;
        set(&c.tx_msgs, self.stats.tx_msgs);
        set(&c.tx_bytes, self.stats.tx_bytes);
        set(&c.rx_msgs, self.stats.rx_msgs);
        set(&c.rx_bytes, self.stats.rx_bytes);
        set(&c.rx_full, self.stats.rx_full);
        set(&c.violations, self.stats.violations_total());
        set(&c.refused, self.stats.refused);
        set(&c.events_dropped, self.stats.events_dropped);
    }

    /// Whether the application has queued TX messages or control requests (a cheap check for
    /// the idle policy).
    pub fn has_work(&mut self) -> bool {
        !self.poisoned
            && !self.dead
            && (self.tx_batch_pos < self.tx_batch_len
                || self.tx_ring.available(1).is_ok_and(|n| n > 0)
                || self.sq.available(1).is_ok_and(|n| n > 0))
    }

    /// Before sleeping on [`EngineChannel::engine_bell`]: announces the sleep to the
    /// application and re-checks for work. Returns false (and cancels the announcement) if
    /// there is work; then do not sleep. For many channels, use [`EngineChannel::announce_sleep`]
    /// on each, one [`sleep_barrier`], then [`EngineChannel::is_idle`] on each.
    pub fn prepare_sleep(&mut self) -> bool {
        self.announce_sleep();
        if !self.is_idle(sleep_barrier()) {
            self.finish_sleep();
            return false;
        }
        true
    }

    /// Whether the application is asleep on its doorbell right now (it announced a sleep and
    /// has not woken). For statistics and tests; delivery checks it itself.
    pub fn app_asleep(&self) -> bool {
        self.region.bells().app.word.load(Ordering::SeqCst) & 1 == 1
    }

    /// Announces that the engine is about to sleep (sequentially consistent store).
    pub fn announce_sleep(&mut self) {
        self.region.bells().engine.word.store(1, Ordering::SeqCst);
    }

    /// After [`EngineChannel::announce_sleep`] and [`sleep_barrier`] (pass its result):
    /// whether the application queued nothing meanwhile, so the engine may sleep. Also reads
    /// returned RX buffers: they are not work, and any returned after this point rings the
    /// doorbell. False if the barrier failed and this application relies on it.
    pub fn is_idle(&mut self, barrier_ok: bool) -> bool {
        if !barrier_ok && self.region.bells().app.barrier.load(Ordering::Relaxed) != 0 && !self.dead {
            return false;
        }
        self.refill_rx();
        self.poisoned
            || self.dead
            || !(self.tx_batch_pos < self.tx_batch_len
                || self.tx_ring.has_pending_seqcst()
                || self.sq.has_pending_seqcst())
    }

    /// After waking up: clears the sleep announcement and the doorbell.
    pub fn finish_sleep(&mut self) {
        self.region.bells().engine.word.store(0, Ordering::Relaxed);
        shm::drain(self.engine_bell.as_fd());
    }

    /// Buffer accounting and counters (reads back returned RX buffers first).
    pub fn stats(&mut self) -> EngineStats {
        self.refill_rx();
        let mut s = self.stats;
        s.tx_app = self.tx_own.count(Owner::App);
        s.tx_engine = self.tx_own.count(Owner::Engine);
        s.tx_returning = self.tx_own.count(Owner::Returning);
        s.tx_reclaimed = self.tx_own.count(Owner::Free);
        s.rx_free = self.rx_own.count(Owner::Free);
        s.rx_engine = self.rx_own.count(Owner::Engine);
        s.rx_app = self.rx_own.count(Owner::App);
        s
    }

    /// The application is gone (or detached): marks the channel dead, takes every buffer back
    /// and reports where they were. Afterwards every TX buffer is reclaimed and every RX
    /// buffer free; the channel accepts nothing more. Close the app's flows first: TX buffers
    /// of messages in flight are taken back here.
    pub fn reclaim_all(&mut self) -> Reclaim {
        // Buffers the app already handed back count as returned, not as app-held.
        self.refill_rx();
        self.publish_tx_returns();
        self.dead = true;
        self.region.header().state.store(STATE_DEAD, Ordering::Release);
        // Wake a still-living app so it notices.
        shm::ring(self.app_bell.as_fd());
        let tx = self.tx_own.reset(Owner::Free);
        let rx = self.rx_own.reset(Owner::Free);
        self.tx_ret_pending.clear();
        (self.tx_batch_len, self.tx_batch_pos) = (0, 0);
        self.rx_free.clear();
        for i in (0..self.region.lay.cfg.rx_bufs).rev() {
            let ok = self.rx_free.push(i);
            debug_assert!(ok.is_ok());
        }
        self.cq_overflow.clear();
        Reclaim {
            tx_app: tx[Owner::App as usize],
            tx_engine: tx[Owner::Engine as usize] + tx[Owner::Returning as usize] + tx[Owner::Free as usize],
            rx_app: rx[Owner::App as usize],
            rx_engine: rx[Owner::Engine as usize] + rx[Owner::Free as usize],
        }
    }

    /// The first reason (in [`Violation::ALL`] order) the application violated the protocol
    /// for, if it ever did. Cheap: reads counters.
    pub fn first_violation(&self) -> Option<Violation> {
        Violation::ALL.into_iter().find(|v| self.stats.violations[*v as usize] > 0)
    }

    /// Whether [`EngineChannel::reclaim_all`] ran.
    pub fn is_dead(&self) -> bool {
        self.dead
    }
}

/// The heavy side of the engine-doorbell handshake, once per sleep for all channels: a
/// membarrier on every thread of every process registered for it (applications register when
/// they attach and then publish with a plain release store). Returns false if the kernel
/// refused; pass the result to [`EngineChannel::is_idle`].
pub fn sleep_barrier() -> bool {
    shm::membarrier_global()
}

impl EngineChannel {
    /// Marks the channel closed for the application (and wakes it), before the engine's side
    /// is dropped (dropping it unmaps the region, which can be left to another thread).
    pub fn mark_dead(&mut self) {
        self.region.header().state.store(STATE_DEAD, Ordering::Release);
        shm::ring(self.app_bell.as_fd());
    }
}

impl Drop for EngineChannel {
    fn drop(&mut self) {
        self.mark_dead();
    }
}
