//! Typed access to a mapped channel, shared by the engine and the client: where the header,
//! counters, bells, rings and buffers are, given a validated [`Layout`].

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::layout::{Bells, BufHdr, Counters, Header, Layout, Part, HDR_FLAG_DOORBELLS, MAGIC, STATE_ALIVE, VERSION};
use crate::ring::{Consumer, Producer, Slot};
use crate::shm::Mapping;

/// A mapping plus the layout it was validated against. Every accessor stays inside the
/// mapping: the layout's `total_len` is at most the mapping's length (checked on creation).
pub(crate) struct Region {
    map: Mapping,
    pub(crate) lay: Layout,
}

impl Region {
    /// Wraps `map` laid out as `lay`. Panics if the layout does not fit (a caller bug: both
    /// constructors check first).
    pub(crate) fn new(map: Mapping, lay: Layout) -> Region {
        assert!(lay.total_len <= map.len());
        Region { map, lay }
    }

    pub(crate) fn mapped_len(&self) -> usize {
        self.map.len()
    }

    fn at(&self, off: usize) -> NonNull<u8> {
        debug_assert!(off < self.lay.total_len);
        // SAFETY: `off` is an offset of the layout, inside the mapping (constructor check).
        unsafe { self.map.base().add(off) }
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the header is at offset 0, 8-aligned (page-aligned mapping), inside the mapping,
        // and consists of atomics only, so a shared reference is sound while the peer writes.
        unsafe { self.at(0).cast::<Header>().as_ref() }
    }

    pub(crate) fn counters(&self) -> &Counters {
        // SAFETY: the counters part of the layout, 64-aligned, atomics only.
        unsafe { self.at(self.lay.offset(Part::Counters)).cast::<Counters>().as_ref() }
    }

    pub(crate) fn bells(&self) -> &Bells {
        // SAFETY: the bells part of the layout, 64-aligned, atomics only.
        unsafe { self.at(self.lay.offset(Part::Bells)).cast::<Bells>().as_ref() }
    }

    /// A producer on ring `part` with `entries` slots.
    ///
    /// # Safety
    ///
    /// `part` must be a ring of `T` with `entries` slots in this layout, the handle must not
    /// outlive `self`, and no other producer may exist for that ring in this process.
    pub(crate) unsafe fn producer<T: Slot>(&self, part: Part, entries: u32) -> Producer<T> {
        // SAFETY: forwarded contract; the ring lies inside the mapping.
        unsafe { Producer::new(self.at(self.lay.offset(part)), entries) }
    }

    /// A consumer on ring `part`.
    ///
    /// # Safety
    ///
    /// As [`Region::producer`].
    pub(crate) unsafe fn consumer<T: Slot>(&self, part: Part, entries: u32) -> Consumer<T> {
        // SAFETY: forwarded contract.
        unsafe { Consumer::new(self.at(self.lay.offset(part)), entries) }
    }

    /// Raw pointer to the slot of buffer `idx` in `pool` (`Part::TxPool` / `Part::RxPool`).
    /// Asserts `idx` is inside the pool (callers check first; the assert keeps it sound).
    #[inline(always)]
    pub(crate) fn slot(&self, pool: Part, idx: u32) -> *mut u8 {
        let n = if pool == Part::TxPool { self.lay.cfg.tx_bufs } else { self.lay.cfg.rx_bufs };
        assert!(idx < n, "buffer index out of range");
        // SAFETY: idx < pool size, so the slot is inside the pool part, inside the mapping.
        unsafe { self.map.base().as_ptr().add(self.lay.offset(pool) + idx as usize * self.lay.buf_stride) }
    }

    /// The header of buffer `idx` (atomics only, so a shared reference is sound).
    #[inline(always)]
    pub(crate) fn buf_hdr(&self, pool: Part, idx: u32) -> &BufHdr {
        // SAFETY: `slot` is in range and 64-aligned; the header lies at a 16-aligned offset inside
        // the slot (buf_hdr_off + 16 <= stride).
        unsafe { &*self.slot(pool, idx).add(self.lay.buf_hdr_off).cast::<BufHdr>() }
    }

    /// Raw pointer to the payload of buffer `idx` (`mss` bytes from the start of the slot).
    /// Never turned into a reference: the peer may write it at any time.
    #[inline(always)]
    pub(crate) fn payload(&self, pool: Part, idx: u32) -> *mut u8 {
        self.slot(pool, idx)
    }

    /// Writes the header (engine, before handing the fd out). `magic` goes last, with release.
    pub(crate) fn init_header(&self, name: &str, doorbells: bool) {
        let h = self.header();
        let c = &self.lay.cfg;
        h.version.store(VERSION, Ordering::Relaxed);
        h.header_len.store(core::mem::size_of::<Header>() as u32, Ordering::Relaxed);
        h.total_len.store(self.lay.total_len as u64, Ordering::Relaxed);
        h.state.store(STATE_ALIVE, Ordering::Relaxed);
        h.flags.store(if doorbells { HDR_FLAG_DOORBELLS } else { 0 }, Ordering::Relaxed);
        h.mss.store(c.mss, Ordering::Relaxed);
        h.buf_stride.store(self.lay.buf_stride as u32, Ordering::Relaxed);
        h.tx_bufs.store(c.tx_bufs, Ordering::Relaxed);
        h.rx_bufs.store(c.rx_bufs, Ordering::Relaxed);
        h.tx_ring.store(c.tx_ring, Ordering::Relaxed);
        h.rx_ring.store(c.rx_ring, Ordering::Relaxed);
        h.tx_ret_ring.store(self.lay.tx_ret_ring, Ordering::Relaxed);
        h.rx_ret_ring.store(self.lay.rx_ret_ring, Ordering::Relaxed);
        h.ctrl_ring.store(c.ctrl_ring, Ordering::Relaxed);
        h.buf_hdr_off.store(self.lay.buf_hdr_off as u32, Ordering::Relaxed);
        for (slot, off) in h.offsets.iter().zip(self.lay.offsets) {
            slot.store(off as u64, Ordering::Relaxed);
        }
        let mut name_bytes = [0u8; 32];
        let n = name.len().min(31);
        name_bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        for (i, w) in h.name.iter().enumerate() {
            w.store(u64::from_le_bytes(name_bytes[i * 8..i * 8 + 8].try_into().unwrap()), Ordering::Relaxed);
        }
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// The channel name from the header.
    pub(crate) fn name(&self) -> String {
        let mut b = Vec::with_capacity(32);
        for w in &self.header().name {
            b.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    }
}

/// Stores `v` into a counter the caller alone writes (a relaxed store, no read-modify-write).
#[inline(always)]
pub(crate) fn set(c: &AtomicU64, v: u64) {
    c.store(v, Ordering::Relaxed);
}
