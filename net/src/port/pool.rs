//! Heap packet buffers and a preallocated free list, shared by the `mem` and `udp` backends.
//! [`HeapBuf`] and [`Pool`] need only `alloc`; the per-queue caches in front of a shared spare
//! list ([`CachedPool`]) take a lock and need `std`.

use super::PacketBuf;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

/// A heap-allocated packet buffer of fixed capacity.
#[derive(Debug)]
pub struct HeapBuf {
    data: Box<[u8]>,
    len: usize,
    /// Receive time in ns on the monotonic base, 0 if unknown.
    rx_ns: u64,
}

impl HeapBuf {
    /// A zeroed buffer of `capacity` bytes (allocates: used only when filling a pool).
    pub fn with_capacity(capacity: usize) -> Self {
        HeapBuf { data: vec![0u8; capacity].into_boxed_slice(), len: 0, rx_ns: 0 }
    }

    /// Records when the frame arrived (backends that know).
    pub fn set_rx_timestamp(&mut self, at: crate::time::Instant) {
        self.rx_ns = at.as_nanos();
    }
}

impl PacketBuf for HeapBuf {
    #[inline]
    fn frame(&self) -> &[u8] {
        &self.data[..self.len]
    }
    #[inline]
    fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
    #[inline]
    fn storage_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    #[inline]
    fn capacity(&self) -> usize {
        self.data.len()
    }
    #[inline]
    fn set_len(&mut self, len: usize) {
        self.len = len.min(self.data.len());
    }
    #[inline]
    fn rx_timestamp(&self) -> Option<crate::time::Instant> {
        (self.rx_ns != 0).then_some(crate::time::Instant(self.rx_ns))
    }
}

/// A free list of [`HeapBuf`]s, filled at creation; never allocates afterwards (its vector has
/// room for `limit` buffers, more than it can ever hold).
#[derive(Debug)]
pub struct Pool {
    free: Vec<HeapBuf>,
    buf_size: usize,
}

impl Pool {
    /// A pool with `count` buffers of `buf_size` bytes and room to hold up to `limit` buffers.
    pub fn new(count: usize, buf_size: usize, limit: usize) -> Self {
        let mut free = Vec::with_capacity(limit.max(count));
        free.extend((0..count).map(|_| HeapBuf::with_capacity(buf_size)));
        Pool { free, buf_size }
    }
    /// An empty pool (buffers arrive through `put`).
    pub fn empty(buf_size: usize, limit: usize) -> Self {
        Pool { free: Vec::with_capacity(limit), buf_size }
    }
    /// A buffer with length 0.
    #[inline]
    pub fn get(&mut self) -> Option<HeapBuf> {
        let mut b = self.free.pop()?;
        b.len = 0;
        b.rx_ns = 0;
        Some(b)
    }
    /// Returns a buffer. A buffer of another size, or one beyond the pool's limit, is dropped
    /// rather than grow the list.
    #[inline]
    pub fn put(&mut self, buf: HeapBuf) {
        if buf.data.len() == self.buf_size && self.free.len() < self.free.capacity() {
            self.free.push(buf);
        }
    }
    /// Buffers available.
    pub fn available(&self) -> usize {
        self.free.len()
    }
    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
    /// Moves up to `n` buffers into `other`.
    pub fn transfer(&mut self, other: &mut Pool, n: usize) {
        for _ in 0..n {
            match self.free.pop() {
                Some(b) => other.put(b),
                None => break,
            }
        }
    }
}

/// The buffers of one port shared by its queues: each queue keeps a local free list (a
/// [`CachedPool`]) and exchanges batches with this spare list, as DPDK's mempool caches do, so a
/// buffer received on one queue and freed on another (a frame handed between shards) returns
/// to the port's buffers instead of overflowing one queue's list while another runs dry.
#[cfg(feature = "std")]
pub type SharedSpare = std::sync::Arc<std::sync::Mutex<Pool>>;

/// A spare list able to hold all `total` buffers of a port.
#[cfg(feature = "std")]
pub fn shared_spare(buf_size: usize, total: usize) -> SharedSpare {
    std::sync::Arc::new(std::sync::Mutex::new(Pool::empty(buf_size, total)))
}

#[cfg(feature = "std")]
fn lock_spare(s: &SharedSpare) -> std::sync::MutexGuard<'_, Pool> {
    // A panic elsewhere must not cascade: the data is plain buffers.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One queue's cache in front of a port's [`SharedSpare`]: the lock is taken once per batch of
/// [`BURST`](super::BURST) buffers, never per buffer.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct CachedPool {
    local: Pool,
    spare: SharedSpare,
    /// Above this many local buffers, a batch goes back to the spare list.
    high_water: usize,
}

#[cfg(feature = "std")]
impl CachedPool {
    /// A cache starting with `count` new buffers of `buf_size` bytes, in front of `spare`, which
    /// (with every other cache on it) holds at most `total` buffers.
    pub fn new(spare: SharedSpare, count: usize, buf_size: usize, total: usize) -> Self {
        CachedPool { local: Pool::new(count, buf_size, total), spare, high_water: count + super::BURST }
    }

    /// A buffer with length 0, from the local list or else a batch from the spare list.
    #[inline]
    pub fn get(&mut self) -> Option<HeapBuf> {
        if let Some(b) = self.local.get() {
            return Some(b);
        }
        lock_spare(&self.spare).transfer(&mut self.local, super::BURST);
        self.local.get()
    }

    /// Returns a buffer; a batch spills to the spare list above the high-water mark.
    #[inline]
    pub fn put(&mut self, buf: HeapBuf) {
        self.local.put(buf);
        if self.local.available() > self.high_water {
            let mut spare = lock_spare(&self.spare);
            self.local.transfer(&mut spare, super::BURST);
        }
    }

    /// Buffers in the local list.
    pub fn available(&self) -> usize {
        self.local.available()
    }

    /// Buffers in the shared spare list.
    #[cfg(test)]
    pub(crate) fn spare_available(&self) -> usize {
        lock_spare(&self.spare).available()
    }
}
