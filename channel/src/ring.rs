//! Single-producer single-consumer rings of fixed-size descriptors in shared memory.
//!
//! glommio's SPSC queue, adapted to two processes that do not trust each other:
//!
//! * The producer index (`prod`, next slot to fill) and the consumer index (`cons`, next slot
//!   to read) are free-running `u32`s on separate cache lines of the ring header
//!   ([`RING_PROD_OFF`], [`RING_CONS_OFF`]); slots follow at [`RING_HDR_LEN`]. Entries are a
//!   power of two; `prod − cons ∈ [0, entries]`.
//! * Each side keeps its own index privately and only *publishes* it; it never reads its own
//!   index back from shared memory. It caches the other side's index and reloads it only when
//!   the cached value says "full" (producer) or "empty" (consumer).
//! * Publication is release/acquire: slot writes happen before the producer's release store of
//!   `prod`; the consumer's acquire load of `prod` happens before its slot reads; the
//!   consumer's release store of `cons` happens after its slot reads, and the producer
//!   acquires `cons` before overwriting.
//! * A reloaded index is checked: it must move forward and stay within `entries` of the
//!   private index. Anything else is [`Corrupt`]: the peer wrote garbage, and the caller
//!   decides what to do (the engine poisons that channel). No value of the peer's index can
//!   make this side read or write outside the slot array, because slot addresses are always
//!   `index & mask`.
//! * Slots are copied in and out 32-bit word by word with relaxed atomic accesses
//!   ([`Slot`]), so a peer writing a slot concurrently is not a data race in Rust's memory model;
//!   the reader gets some bit pattern, which every [`Slot`] type accepts.
//!
//! The module does no system calls and touches only memory handed to it, so Miri runs its tests
//! on heap memory.

use core::marker::PhantomData;
use core::mem::{align_of, size_of, MaybeUninit};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};
use std::fmt;

use crate::layout::{CtrlEntry, MsgDesc, RING_CONS_OFF, RING_HDR_LEN, RING_PROD_OFF};

/// A type that can live in a ring slot.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]` (or a primitive), have a size that is a non-zero
/// multiple of 4, an alignment of at least 4, no padding bytes, and be valid for every bit
/// pattern: slots are copied as `u32` words and may contain anything the peer wrote.
pub unsafe trait Slot: Copy {}

// SAFETY: a u32 is one word, valid for every bit pattern.
unsafe impl Slot for u32 {}
// SAFETY: MsgDesc is repr(C), 32 bytes of u32/u16 fields with no padding (asserted in layout),
// every bit pattern is a valid value.
unsafe impl Slot for MsgDesc {}
// SAFETY: CtrlEntry is repr(C), 32 bytes of u64/u32/u16 fields with no padding (asserted in
// layout), every bit pattern is a valid value.
unsafe impl Slot for CtrlEntry {}

const fn words<T: Slot>() -> usize {
    assert!(size_of::<T>() % 4 == 0 && size_of::<T>() > 0 && align_of::<T>() >= 4);
    size_of::<T>() / 4
}

/// Reads a slot word by word with relaxed atomic loads.
///
/// # Safety
///
/// `src` must be valid for reads of `size_of::<T>()` bytes, 4-aligned, for the duration of the
/// call, and only ever accessed atomically by others while this runs.
#[inline(always)]
pub unsafe fn load_slot<T: Slot>(src: *const T) -> T {
    let mut out = MaybeUninit::<T>::uninit();
    let dst = out.as_mut_ptr().cast::<u32>();
    let src = src.cast::<u32>();
    for i in 0..words::<T>() {
        // SAFETY: `src.add(i)` is inside the slot (i < words) and 4-aligned (caller); the word
        // is accessed only atomically (caller), so `from_ptr` is sound. `dst.add(i)` is inside
        // `out`, which is 4-aligned because `T` is (Slot contract).
        unsafe { dst.add(i).write(AtomicU32::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed)) };
    }
    // SAFETY: every word of `out` was written and `T` accepts every bit pattern (Slot contract).
    unsafe { out.assume_init() }
}

/// Writes a slot word by word with relaxed atomic stores.
///
/// # Safety
///
/// As [`load_slot`], for writes.
#[inline(always)]
pub unsafe fn store_slot<T: Slot>(dst: *mut T, v: T) {
    let src = (&v as *const T).cast::<u32>();
    let dst = dst.cast::<u32>();
    for i in 0..words::<T>() {
        // SAFETY: `src.add(i)` reads a word of the local `v` (no padding: Slot contract);
        // `dst.add(i)` is inside the slot, 4-aligned and only accessed atomically (caller).
        unsafe { AtomicU32::from_ptr(dst.add(i)).store(src.add(i).read(), Ordering::Relaxed) };
    }
}

/// The peer published an index that cannot be right (moved backwards or beyond the ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corrupt;

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring index corrupted by the peer")
    }
}

impl std::error::Error for Corrupt {}

/// Raw pieces of a ring: where its indices and slots are.
#[derive(Clone, Copy)]
struct Raw<T> {
    prod: NonNull<AtomicU32>,
    cons: NonNull<AtomicU32>,
    slots: NonNull<T>,
    mask: u32,
}

impl<T: Slot> Raw<T> {
    /// # Safety
    ///
    /// `base` is a ring header followed by `entries` slots of `T`, 64-aligned, valid for the
    /// lifetime of the handle built from it, and accessed by others only through atomics.
    unsafe fn new(base: NonNull<u8>, entries: u32) -> Self {
        assert!(entries.is_power_of_two() && entries <= 1 << 31, "ring entries must be a power of two");
        assert!(base.as_ptr() as usize % 64 == 0, "ring must be cache-line aligned");
        // SAFETY: the offsets are inside the ring (caller), so the pointers are non-null.
        unsafe {
            Raw {
                prod: base.add(RING_PROD_OFF).cast(),
                cons: base.add(RING_CONS_OFF).cast(),
                slots: base.add(RING_HDR_LEN).cast(),
                mask: entries - 1,
            }
        }
    }

    #[inline(always)]
    fn prod(&self) -> &AtomicU32 {
        // SAFETY: points into the ring header, valid while the handle lives (constructor
        // contract); shared memory is only accessed atomically.
        unsafe { self.prod.as_ref() }
    }

    #[inline(always)]
    fn cons(&self) -> &AtomicU32 {
        // SAFETY: as `prod`.
        unsafe { self.cons.as_ref() }
    }

    #[inline(always)]
    fn slot(&self, index: u32) -> *mut T {
        // SAFETY: `index & mask < entries`, so the slot is inside the ring.
        unsafe { self.slots.as_ptr().add((index & self.mask) as usize) }
    }

    fn entries(&self) -> u32 {
        self.mask.wrapping_add(1)
    }
}

/// The producing end of a ring.
pub struct Producer<T: Slot> {
    raw: Raw<T>,
    /// Next index to write (private; published as `prod`).
    tail: u32,
    /// Last index published.
    published: u32,
    /// Consumer index last seen.
    cached_cons: u32,
    _t: PhantomData<T>,
}

// SAFETY: a Producer is the only handle that writes slots and `prod` of its ring; the ring
// memory is shared through atomics only, so moving the handle to another thread is sound.
unsafe impl<T: Slot> Send for Producer<T> {}

impl<T: Slot> Producer<T> {
    /// Attaches the producing end of the ring at `base`, continuing from the published indices.
    ///
    /// # Safety
    ///
    /// `base` must point to a ring header followed by `entries` slots of `T`, cache-line
    /// aligned, valid (and not unmapped) for the lifetime of the producer, accessed by anybody
    /// else only through atomics, and no other producer may exist for this ring.
    pub unsafe fn new(base: NonNull<u8>, entries: u32) -> Self {
        // SAFETY: forwarded contract.
        let raw = unsafe { Raw::<T>::new(base, entries) };
        let tail = raw.prod().load(Ordering::Relaxed);
        let mut cons = raw.cons().load(Ordering::Acquire);
        if tail.wrapping_sub(cons) > raw.entries() {
            // Inconsistent at attach: behave as full until the consumer catches up.
            cons = tail.wrapping_sub(raw.entries());
        }
        Producer { raw, tail, published: tail, cached_cons: cons, _t: PhantomData }
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.raw.entries()
    }

    /// Free slots by the cached consumer index (no shared-memory read).
    #[inline]
    fn cached_free(&self) -> u32 {
        self.raw.entries() - self.tail.wrapping_sub(self.cached_cons)
    }

    /// Reloads the consumer index, validating it.
    #[inline]
    fn refresh(&mut self) -> Result<u32, Corrupt> {
        let c = self.raw.cons().load(Ordering::Acquire);
        // The consumer may only move forward, and never past what was published.
        if c.wrapping_sub(self.cached_cons) > self.published.wrapping_sub(self.cached_cons) {
            return Err(Corrupt);
        }
        self.cached_cons = c;
        Ok(self.cached_free())
    }

    /// Free slots, reloading the consumer index only if fewer than `want` are known free.
    #[inline]
    pub fn free(&mut self, want: u32) -> Result<u32, Corrupt> {
        let f = self.cached_free();
        if f >= want {
            return Ok(f);
        }
        self.refresh()
    }

    /// Whether the consumer has left a slot free, read with a sequentially consistent load (the
    /// re-check after announcing a sleep, as [`Consumer::has_pending_seqcst`]).
    pub fn has_room_seqcst(&self) -> bool {
        self.tail.wrapping_sub(self.raw.cons().load(Ordering::SeqCst)) < self.capacity()
    }

    /// Writes `v` into the next slot without publishing it. Returns `Ok(false)` if full.
    #[inline]
    pub fn write(&mut self, v: T) -> Result<bool, Corrupt> {
        if self.free(1)? == 0 {
            return Ok(false);
        }
        // SAFETY: the slot is inside the ring; it is free (the consumer has released it:
        // `cons` acquired in `refresh`), and the ring is accessed atomically by everybody.
        unsafe { store_slot(self.raw.slot(self.tail), v) };
        self.tail = self.tail.wrapping_add(1);
        Ok(true)
    }

    /// Writes as many of `items` as fit without publishing; returns how many.
    pub fn write_batch(&mut self, items: &[T]) -> Result<usize, Corrupt> {
        let n = (self.free(items.len().min(u32::MAX as usize) as u32)? as usize).min(items.len());
        for v in &items[..n] {
            // SAFETY: as in `write`: `n` slots are free.
            unsafe { store_slot(self.raw.slot(self.tail), *v) };
            self.tail = self.tail.wrapping_add(1);
        }
        Ok(n)
    }

    /// Entries written but not yet published.
    pub fn unpublished(&self) -> u32 {
        self.tail.wrapping_sub(self.published)
    }

    /// Publishes everything written so far (release store of `prod`).
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.tail {
            self.raw.prod().store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// Publishes with a sequentially consistent store: use before checking the consumer's
    /// sleep flag with a `SeqCst` load (the doorbell handshake).
    #[inline]
    pub fn publish_seqcst(&mut self) {
        if self.published != self.tail {
            self.raw.prod().store(self.tail, Ordering::SeqCst);
            self.published = self.tail;
        }
    }

    /// Writes and publishes one entry. Returns `Ok(false)` if the ring is full.
    #[inline]
    pub fn push(&mut self, v: T) -> Result<bool, Corrupt> {
        let ok = self.write(v)?;
        self.publish();
        Ok(ok)
    }

    /// Entries in the ring as far as this side knows (published or not, minus consumed as last
    /// seen).
    pub fn len_cached(&self) -> u32 {
        self.tail.wrapping_sub(self.cached_cons)
    }
}

/// The consuming end of a ring.
pub struct Consumer<T: Slot> {
    raw: Raw<T>,
    /// Next index to read (private; released as `cons`).
    head: u32,
    /// Last index released.
    released: u32,
    /// Producer index last seen.
    cached_prod: u32,
    _t: PhantomData<T>,
}

// SAFETY: as for Producer: the only handle that reads slots and writes `cons` of its ring.
unsafe impl<T: Slot> Send for Consumer<T> {}

impl<T: Slot> Consumer<T> {
    /// Attaches the consuming end of the ring at `base`, continuing from the published indices.
    ///
    /// # Safety
    ///
    /// As [`Producer::new`], with "no other consumer".
    pub unsafe fn new(base: NonNull<u8>, entries: u32) -> Self {
        // SAFETY: forwarded contract.
        let raw = unsafe { Raw::<T>::new(base, entries) };
        let head = raw.cons().load(Ordering::Relaxed);
        let mut prod = raw.prod().load(Ordering::Acquire);
        if prod.wrapping_sub(head) > raw.entries() {
            prod = head;
        }
        Consumer { raw, head, released: head, cached_prod: prod, _t: PhantomData }
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.raw.entries()
    }

    #[inline]
    fn refresh(&mut self) -> Result<u32, Corrupt> {
        let p = self.raw.prod().load(Ordering::Acquire);
        let avail = p.wrapping_sub(self.head);
        // Forward only, and at most one ring's worth ahead of what this side has released.
        if avail > self.raw.entries()
            || p.wrapping_sub(self.released) > self.raw.entries()
            || avail < self.cached_prod.wrapping_sub(self.head)
        {
            return Err(Corrupt);
        }
        self.cached_prod = p;
        Ok(avail)
    }

    /// Entries available, reloading the producer index only if the cached one says fewer than
    /// `want`.
    #[inline]
    pub fn available(&mut self, want: u32) -> Result<u32, Corrupt> {
        let a = self.cached_prod.wrapping_sub(self.head);
        if a >= want {
            return Ok(a);
        }
        self.refresh()
    }

    /// Reads the next entry without releasing its slot (call [`Consumer::release`] later).
    #[inline]
    pub fn read(&mut self) -> Result<Option<T>, Corrupt> {
        if self.available(1)? == 0 {
            return Ok(None);
        }
        // SAFETY: the slot is inside the ring and was published (acquired in `refresh`); the
        // producer does not reuse it before we release it, and all access is atomic.
        let v = unsafe { load_slot(self.raw.slot(self.head)) };
        self.head = self.head.wrapping_add(1);
        Ok(Some(v))
    }

    /// Reads up to `out.len()` entries without releasing; returns how many.
    pub fn read_batch(&mut self, out: &mut [T]) -> Result<usize, Corrupt> {
        let n = (self.available(out.len().min(u32::MAX as usize) as u32)? as usize).min(out.len());
        for o in &mut out[..n] {
            // SAFETY: as in `read`: `n` entries are published and unreleased.
            *o = unsafe { load_slot(self.raw.slot(self.head)) };
            self.head = self.head.wrapping_add(1);
        }
        Ok(n)
    }

    /// Releases every slot read so far to the producer (release store of `cons`).
    #[inline]
    pub fn release(&mut self) {
        if self.released != self.head {
            self.raw.cons().store(self.head, Ordering::Release);
            self.released = self.head;
        }
    }

    /// Reads and releases one entry.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<T>, Corrupt> {
        let v = self.read()?;
        self.release();
        Ok(v)
    }

    /// Whether the producer has published entries this side has not read, with a
    /// sequentially consistent load (the sleeper's re-check in the doorbell handshake).
    pub fn has_pending_seqcst(&self) -> bool {
        self.raw.prod().load(Ordering::SeqCst) != self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    /// A zeroed, 64-aligned heap region standing in for shared memory.
    struct Mem {
        ptr: NonNull<u8>,
        layout: Layout,
    }

    // SAFETY: the region is plain heap memory; rings access it through atomics only.
    unsafe impl Send for Mem {}
    // SAFETY: as above.
    unsafe impl Sync for Mem {}

    impl Mem {
        fn new(len: usize) -> Mem {
            let layout = Layout::from_size_align(len, 64).unwrap();
            // SAFETY: non-zero size.
            let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
            Mem { ptr, layout }
        }
        fn word(&self, off: usize) -> &AtomicU32 {
            assert!(off + 4 <= self.layout.size() && off % 4 == 0);
            // SAFETY: inside the allocation, aligned, only accessed atomically.
            unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast()) }
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }

    fn pair<T: Slot>(mem: &Mem, entries: u32) -> (Producer<T>, Consumer<T>) {
        // SAFETY: `mem` holds a header and `entries` slots and outlives the handles in each test.
        unsafe { (Producer::new(mem.ptr, entries), Consumer::new(mem.ptr, entries)) }
    }

    fn ring_mem<T>(entries: u32) -> Mem {
        Mem::new(RING_HDR_LEN + entries as usize * size_of::<T>())
    }

    #[test]
    fn fifo_fill_drain_wrap() {
        let mem = ring_mem::<u32>(8);
        let (mut p, mut c) = pair::<u32>(&mem, 8);
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        // Many rounds so the u32 indices wrap the slot array repeatedly.
        for round in 0..50u32 {
            let n = round % 9;
            for _ in 0..n {
                assert_eq!(p.write(next_in), Ok(true));
                next_in += 1;
            }
            // Unpublished entries are invisible to the consumer.
            assert_eq!(c.available(1), Ok(0));
            p.publish();
            for _ in 0..n {
                assert_eq!(c.pop(), Ok(Some(next_out)));
                next_out += 1;
            }
            assert_eq!(c.pop(), Ok(None));
        }
    }

    #[test]
    fn full_ring_refuses_and_recovers() {
        let mem = ring_mem::<u32>(4);
        let (mut p, mut c) = pair::<u32>(&mem, 4);
        for i in 0..4 {
            assert_eq!(p.push(i), Ok(true));
        }
        assert_eq!(p.push(99), Ok(false), "a full ring refuses");
        assert_eq!(c.read(), Ok(Some(0)));
        // Read but not released: still full for the producer.
        assert_eq!(p.push(99), Ok(false));
        c.release();
        assert_eq!(p.push(4), Ok(true));
        let mut out = [0u32; 8];
        assert_eq!(c.read_batch(&mut out), Ok(4));
        assert_eq!(&out[..4], &[1, 2, 3, 4]);
        c.release();
        assert_eq!(p.write_batch(&[5, 6, 7, 8, 9, 10]), Ok(4));
        p.publish();
        assert_eq!(c.read_batch(&mut out), Ok(4));
        assert_eq!(&out[..4], &[5, 6, 7, 8]);
    }

    #[test]
    fn descriptors_round_trip() {
        let mem = ring_mem::<MsgDesc>(2);
        let (mut p, mut c) = pair::<MsgDesc>(&mem, 2);
        let d = MsgDesc {
            flow: crate::layout::MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 },
            head: 5,
            count: 6,
            len: 7,
            flags: 8,
            reserved: 9,
        };
        assert_eq!(p.push(d), Ok(true));
        assert_eq!(c.pop(), Ok(Some(d)));
        let e = CtrlEntry { id: u64::MAX - 1, op: 2, status: 3, flow: d.flow, aux: 7 };
        let mem2 = ring_mem::<CtrlEntry>(2);
        let (mut p2, mut c2) = pair::<CtrlEntry>(&mem2, 2);
        assert_eq!(p2.push(e), Ok(true));
        assert_eq!(c2.pop(), Ok(Some(e)));
    }

    #[test]
    fn corrupt_producer_index_is_detected_not_followed() {
        let mem = ring_mem::<u32>(8);
        let (mut p, mut c) = pair::<u32>(&mem, 8);
        assert_eq!(p.push(1), Ok(true));
        assert_eq!(c.pop(), Ok(Some(1)));
        let prod = mem.word(RING_PROD_OFF);
        // Beyond one ring's worth.
        prod.store(1 + 9, Ordering::Relaxed);
        assert_eq!(c.read(), Err(Corrupt));
        // Backwards.
        prod.store(0, Ordering::Relaxed);
        assert_eq!(c.read(), Err(Corrupt));
        // A sane value again is accepted.
        prod.store(3, Ordering::Relaxed);
        assert_eq!(c.available(1), Ok(2));
    }

    #[test]
    fn corrupt_consumer_index_is_detected() {
        let mem = ring_mem::<u32>(4);
        let (mut p, _c) = pair::<u32>(&mem, 4);
        for i in 0..4 {
            assert_eq!(p.push(i), Ok(true));
        }
        let cons = mem.word(RING_CONS_OFF);
        // The consumer claims to have read more than was published.
        cons.store(5, Ordering::Relaxed);
        assert_eq!(p.push(9), Err(Corrupt));
        // Claims to have gone backwards.
        cons.store(u32::MAX, Ordering::Relaxed);
        assert_eq!(p.push(9), Err(Corrupt));
        cons.store(2, Ordering::Relaxed);
        assert_eq!(p.push(9), Ok(true));
    }

    #[test]
    fn reattach_continues_from_published_indices() {
        let mem = ring_mem::<u32>(4);
        {
            let (mut p, mut c) = pair::<u32>(&mem, 4);
            for i in 0..3 {
                assert_eq!(p.push(i), Ok(true));
            }
            assert_eq!(c.pop(), Ok(Some(0)));
        }
        let (mut p, mut c) = pair::<u32>(&mem, 4);
        assert_eq!(c.pop(), Ok(Some(1)));
        assert_eq!(p.push(3), Ok(true));
        assert_eq!(c.pop(), Ok(Some(2)));
        assert_eq!(c.pop(), Ok(Some(3)));
    }

    #[test]
    fn two_threads_transfer_in_order() {
        // Small under Miri (slow interpreter), larger natively.
        let n: u32 = if cfg!(miri) { 300 } else { 200_000 };
        let mem = std::sync::Arc::new(ring_mem::<MsgDesc>(16));
        let (mut p, mut c) = pair::<MsgDesc>(&mem, 16);
        let keep = mem.clone();
        // Either side gives up after a minute: a consumer that died must not leave the
        // producer spinning on a full ring, nor a producer that died the consumer on an empty one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let t = std::thread::spawn(move || {
            let _keep = keep;
            let mut i = 0;
            while i < n {
                assert!(std::time::Instant::now() < deadline, "producer: ring full for a minute at {i} of {n}");
                let d = MsgDesc { head: i, count: !i, len: i.wrapping_mul(3), ..Default::default() };
                if p.write(d).unwrap() {
                    i += 1;
                    if i % 3 == 0 {
                        p.publish();
                    }
                } else {
                    p.publish();
                    std::thread::yield_now();
                }
            }
            p.publish();
        });
        let mut expect = 0;
        let mut batch = [MsgDesc::default(); 5];
        while expect < n {
            assert!(std::time::Instant::now() < deadline, "consumer: only {expect} of {n} arrived in a minute");
            let k = c.read_batch(&mut batch).unwrap();
            for d in &batch[..k] {
                assert_eq!((d.head, d.count, d.len), (expect, !expect, expect.wrapping_mul(3)));
                expect += 1;
            }
            c.release();
            if k == 0 {
                std::thread::yield_now();
            }
        }
        t.join().unwrap();
        assert_eq!(c.pop(), Ok(None));
    }
}
