//! Test support: a counting global allocator to prove hot paths allocate nothing.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: machnet_net::testutil::CountingAlloc = machnet_net::testutil::CountingAlloc;
//!
//! let n = machnet_net::testutil::count_allocs(|| hot_loop());
//! assert_eq!(n, 0);
//! ```
//!
//! Only allocations made by the calling thread while the closure runs are counted, so other
//! test threads do not interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// A global allocator that forwards to the system allocator and counts allocations (and
/// reallocations) made by threads inside [`count_allocs`].
pub struct CountingAlloc;

fn note() {
    // `try_with` fails only during thread teardown; such allocations are not ours to count.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = COUNT.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is exactly the system allocator's; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded unchanged (see impl comment).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns how many allocations this thread made meanwhile. Meaningful only when
/// [`CountingAlloc`] is the global allocator.
pub fn count_allocs<R>(f: impl FnOnce() -> R) -> (u64, R) {
    COUNT.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (COUNT.with(|n| n.get()), r)
}
