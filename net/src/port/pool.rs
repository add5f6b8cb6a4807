//! Heap packet buffers and a preallocated free list, shared by the `mem` and `udp` backends.

use super::PacketBuf;

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
