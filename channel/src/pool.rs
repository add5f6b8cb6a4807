//! Private (process-local) buffer bookkeeping: free lists and the engine's ownership table.
//!
//! Neither structure lives in shared memory. The application keeps a [`FreeList`] of its TX
//! buffers; the engine keeps a [`FreeList`] of its RX buffers and an [`OwnerTable`] per pool
//! saying who holds every buffer, which is how it refuses buffers an application does not own.
//! Both are allocated once at their full capacity and never grow.

use std::fmt;

/// A fixed-capacity LIFO stack of buffer indices. LIFO keeps recently used (cache-hot)
/// buffers in use.
#[derive(Debug)]
pub struct FreeList {
    items: Box<[u32]>,
    len: usize,
}

/// The free list is at capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

impl FreeList {
    /// An empty list that can hold `capacity` indices.
    pub fn with_capacity(capacity: usize) -> FreeList {
        FreeList { items: vec![0; capacity].into_boxed_slice(), len: 0 }
    }

    /// A full list holding `0..n`, arranged so that `pop` returns 0 first.
    pub fn full(n: u32) -> FreeList {
        let mut l = FreeList::with_capacity(n as usize);
        for i in (0..n).rev() {
            l.items[l.len] = i;
            l.len += 1;
        }
        l
    }

    /// Number of indices held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of indices.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    /// Adds an index.
    #[inline]
    pub fn push(&mut self, idx: u32) -> Result<(), Overflow> {
        match self.items.get_mut(self.len) {
            Some(s) => {
                *s = idx;
                self.len += 1;
                Ok(())
            }
            None => Err(Overflow),
        }
    }

    /// Takes the most recently added index.
    #[inline]
    pub fn pop(&mut self) -> Option<u32> {
        self.len = self.len.checked_sub(1)?;
        Some(self.items[self.len])
    }

    /// The most recently added indices, up to `n`, oldest first (for bulk hand-off), without
    /// removing them; see [`FreeList::truncate`].
    pub fn top(&self, n: usize) -> &[u32] {
        &self.items[self.len - n.min(self.len)..self.len]
    }

    /// Keeps only the first `len` indices.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Who holds a buffer, in the engine's private view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Owner {
    /// The application (TX: free or being filled; RX: delivered, not yet returned).
    App = 0,
    /// The engine, in use (TX: accepted message, not yet acknowledged; RX: being assembled).
    Engine = 1,
    /// TX only: freed by the engine, waiting to be published on the TX-return ring.
    Returning = 2,
    /// Engine-side free (RX free list; TX buffers after [`OwnerTable::reset`]).
    Free = 3,
}

impl Owner {
    const ALL: [Owner; 4] = [Owner::App, Owner::Engine, Owner::Returning, Owner::Free];
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Owner::App => "app",
            Owner::Engine => "engine",
            Owner::Returning => "returning",
            Owner::Free => "free",
        })
    }
}

/// One [`Owner`] per buffer, with a running count per owner.
#[derive(Debug)]
pub struct OwnerTable {
    state: Box<[Owner]>,
    counts: [u32; 4],
}

impl OwnerTable {
    /// `n` buffers, all held by `initial`.
    pub fn new(n: u32, initial: Owner) -> OwnerTable {
        let mut counts = [0; 4];
        counts[initial as usize] = n;
        OwnerTable { state: vec![initial; n as usize].into_boxed_slice(), counts }
    }

    /// Number of buffers.
    pub fn len(&self) -> u32 {
        self.state.len() as u32
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Who holds `idx`, or `None` if out of range.
    #[inline]
    pub fn get(&self, idx: u32) -> Option<Owner> {
        self.state.get(idx as usize).copied()
    }

    /// Moves `idx` from `from` to `to`; false (and no change) if `idx` is out of range or not
    /// held by `from`.
    #[inline]
    pub fn transition(&mut self, idx: u32, from: Owner, to: Owner) -> bool {
        match self.state.get_mut(idx as usize) {
            Some(s) if *s == from => {
                *s = to;
                self.counts[from as usize] -= 1;
                self.counts[to as usize] += 1;
                true
            }
            _ => false,
        }
    }

    /// Number of buffers held by `owner`.
    pub fn count(&self, owner: Owner) -> u32 {
        self.counts[owner as usize]
    }

    /// Hands every buffer to `owner`; returns how many each owner held before.
    pub fn reset(&mut self, owner: Owner) -> [u32; 4] {
        let before = self.counts;
        self.state.fill(owner);
        self.counts = [0; 4];
        self.counts[owner as usize] = self.len();
        before
    }

    /// Recounts from scratch; equals the running counts unless there is a bug.
    pub fn recount(&self) -> [u32; 4] {
        let mut c = [0; 4];
        for s in self.state.iter() {
            c[*s as usize] += 1;
        }
        c
    }

    /// All owners, in `counts` order.
    pub fn owners() -> [Owner; 4] {
        Owner::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_is_lifo_and_bounded() {
        let mut l = FreeList::full(4);
        assert_eq!(l.len(), 4);
        assert_eq!(l.push(9), Err(Overflow), "never grows past its capacity");
        assert_eq!(l.pop(), Some(0));
        assert_eq!(l.pop(), Some(1));
        l.push(7).unwrap();
        assert_eq!(l.top(2), &[2, 7]);
        assert_eq!(l.pop(), Some(7));
        l.truncate(1);
        assert_eq!(l.pop(), Some(3));
        assert_eq!(l.pop(), None);
        assert!(l.is_empty());
        let mut e = FreeList::with_capacity(0);
        assert_eq!(e.push(1), Err(Overflow));
        assert_eq!(e.pop(), None);
    }

    #[test]
    fn owner_transitions_are_checked_and_counted() {
        let mut t = OwnerTable::new(8, Owner::App);
        assert!(t.transition(3, Owner::App, Owner::Engine));
        assert!(!t.transition(3, Owner::App, Owner::Engine), "a buffer cannot be taken twice");
        assert!(!t.transition(8, Owner::App, Owner::Engine), "out of range");
        assert!(!t.transition(u32::MAX, Owner::App, Owner::Engine));
        assert!(t.transition(3, Owner::Engine, Owner::Returning));
        assert_eq!(t.get(3), Some(Owner::Returning));
        assert_eq!(t.get(8), None);
        assert_eq!((t.count(Owner::App), t.count(Owner::Returning)), (7, 1));
        assert_eq!(t.recount(), [7, 0, 1, 0]);
        assert_eq!(t.reset(Owner::Free), [7, 0, 1, 0]);
        assert_eq!(t.count(Owner::Free), 8);
        assert_eq!(t.recount(), [0, 0, 0, 8]);
    }

    #[test]
    fn random_walk_keeps_counts_exact() {
        // A deterministic pseudo-random sequence of transitions; counts must always match a
        // recount and sum to the table size (the pool-integrity property).
        let mut t = OwnerTable::new(64, Owner::Free);
        let mut free = FreeList::full(64);
        let mut held = FreeList::with_capacity(64);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let steps = if cfg!(miri) { 2_000 } else { 100_000 };
        for _ in 0..steps {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 2 == 0 {
                if let Some(i) = free.pop() {
                    assert!(t.transition(i, Owner::Free, Owner::Engine));
                    held.push(i).unwrap();
                }
            } else if let Some(i) = held.pop() {
                assert!(t.transition(i, Owner::Engine, Owner::Free));
                free.push(i).unwrap();
            }
            assert_eq!(t.count(Owner::Free) as usize, free.len());
            assert_eq!(t.count(Owner::Engine) as usize, held.len());
        }
        assert_eq!(t.recount().iter().sum::<u32>(), 64);
        assert_eq!(t.recount(), [t.count(Owner::App), t.count(Owner::Engine), 0, t.count(Owner::Free)]);
    }
}
