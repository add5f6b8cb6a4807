//! A hierarchical timing wheel with microsecond resolution.
//!
//! Six levels of 64 slots: level `L` slot `s` covers ticks whose bits `6L..6L+6` are `s` and whose
//! higher bits equal the current tick's, so level 0 spans 64 µs at 1 µs, level 1 4 ms at 64 µs,
//! …, level 5 about 19 hours. A timer goes to the level of the highest 6-bit group in which its
//! tick differs from the current tick (as in Linux's and tokio's wheels). Insert and cancel are
//! O(1): entries live in a slab allocated at creation, linked into per-slot doubly linked
//! lists, and addressed by [`TimerId`] handles carrying a generation. Expiry visits only
//! occupied slots (one 64-bit occupancy mask per level), cascading entries of a higher slot
//! down when time reaches it. Deadlines further than the wheel spans are clamped to its end.

use machnet_net::time::Instant;

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const NIL: u32 = u32::MAX;
/// One tick: 1 µs.
pub const TICK_NS: u64 = 1_000;
const MAX_SPAN: u64 = 1 << (SLOT_BITS as usize * LEVELS);

/// Handle of a pending timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    gen: u32,
}

/// The wheel is at capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl core::fmt::Display for Full {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("timer wheel full")
    }
}

impl std::error::Error for Full {}

#[derive(Debug, Clone, Copy)]
struct Entry<T> {
    tick: u64,
    value: Option<T>,
    prev: u32,
    next: u32,
    level: u8,
    slot: u8,
    gen: u32,
}

/// A timing wheel of `T` values.
#[derive(Debug)]
pub struct TimerWheel<T: Copy> {
    /// Every tick before `current` has been processed.
    current: u64,
    heads: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
    /// No pending timer's tick is below this (`u64::MAX`: none pending): an [`expire`] before
    /// it has nothing to do and returns after one comparison, the common case of a poll loop
    /// calling it every turn.
    ///
    /// [`expire`]: Self::expire
    due: u64,
}

impl<T: Copy> TimerWheel<T> {
    /// A wheel for up to `capacity` pending timers, starting at `now`.
    pub fn new(capacity: usize, now: Instant) -> Self {
        TimerWheel {
            current: now.as_nanos() / TICK_NS,
            heads: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            entries: vec![Entry { tick: 0, value: None, prev: NIL, next: NIL, level: 0, slot: 0, gen: 0 }; capacity],
            free: (0..capacity as u32).rev().collect(),
            len: 0,
            due: u64::MAX,
        }
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `value` at `at` (a past instant fires at the next [`expire`](Self::expire)).
    pub fn insert(&mut self, at: Instant, value: T) -> Result<TimerId, Full> {
        let index = self.free.pop().ok_or(Full)?;
        let tick = (at.as_nanos().div_ceil(TICK_NS)).clamp(self.current, self.current + MAX_SPAN - 1);
        let e = &mut self.entries[index as usize];
        e.tick = tick;
        e.value = Some(value);
        let gen = e.gen;
        self.link(index);
        self.len += 1;
        self.due = self.due.min(tick);
        Ok(TimerId { index, gen })
    }

    /// Cancels a pending timer and returns its value; `None` if it already fired or was
    /// cancelled.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let e = self.entries.get(id.index as usize)?;
        if e.gen != id.gen || e.value.is_none() {
            return None;
        }
        self.unlink(id.index);
        let e = &mut self.entries[id.index as usize];
        let v = e.value.take();
        e.gen = e.gen.wrapping_add(1);
        self.free.push(id.index);
        self.len -= 1;
        v
    }

    /// True when [`expire`](Self::expire) at `now` may have something to do (false: it
    /// certainly has not). One comparison.
    #[inline]
    pub fn may_expire(&self, now: Instant) -> bool {
        now.as_nanos() / TICK_NS >= self.due
    }

    /// A lower bound of the earliest pending deadline (exact within the next 64 µs).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_slot().map(|(_, _, start)| Instant(start * TICK_NS))
    }

    /// Fires every timer whose deadline is at or before `now`, in deadline order, calling `f`
    /// with each value. Returns how many fired.
    pub fn expire(&mut self, now: Instant, mut f: impl FnMut(T)) -> usize {
        let target = now.as_nanos() / TICK_NS;
        if !self.may_expire(now) {
            // Nothing is due. `current` stays where it is: the slots are laid out relative to
            // it, so `next_deadline` stays as exact as the last full pass left it.
            return 0;
        }
        let mut fired = 0;
        while let Some((level, slot, start)) = self.next_slot() {
            if start > target {
                break;
            }
            self.current = self.current.max(start);
            let mut i = self.heads[level][slot];
            self.heads[level][slot] = NIL;
            self.occupied[level] &= !(1u64 << slot);
            while i != NIL {
                let next = self.entries[i as usize].next;
                if self.entries[i as usize].tick <= self.current {
                    let e = &mut self.entries[i as usize];
                    let v = e.value.take().expect("linked entries hold values");
                    e.gen = e.gen.wrapping_add(1);
                    self.free.push(i);
                    self.len -= 1;
                    fired += 1;
                    f(v);
                } else {
                    self.link(i);
                }
                i = next;
            }
        }
        self.current = self.current.max(target);
        // Every pending tick is at or after the start of its slot.
        self.due = self.next_slot().map_or(u64::MAX, |(_, _, start)| start);
        fired
    }

    fn level_of(&self, tick: u64) -> usize {
        let x = tick ^ self.current;
        if x == 0 {
            0
        } else {
            ((63 - x.leading_zeros()) / SLOT_BITS) as usize
        }
    }

    fn link(&mut self, i: u32) {
        let tick = self.entries[i as usize].tick;
        let level = self.level_of(tick).min(LEVELS - 1);
        let slot = ((tick >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
        let head = self.heads[level][slot];
        {
            let e = &mut self.entries[i as usize];
            e.level = level as u8;
            e.slot = slot as u8;
            e.prev = NIL;
            e.next = head;
        }
        if head != NIL {
            self.entries[head as usize].prev = i;
        }
        self.heads[level][slot] = i;
        self.occupied[level] |= 1u64 << slot;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, level, slot) = {
            let e = &self.entries[i as usize];
            (e.prev, e.next, e.level as usize, e.slot as usize)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.heads[level][slot] = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        if self.heads[level][slot] == NIL {
            self.occupied[level] &= !(1u64 << slot);
        }
    }

    /// The earliest occupied slot: (level, slot, first tick it covers).
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for level in 0..LEVELS {
            let shift = SLOT_BITS as usize * level;
            let cur = ((self.current >> shift) as usize) & (SLOTS - 1);
            let mask = self.occupied[level] & (!0u64 << cur);
            if mask == 0 {
                continue;
            }
            let slot = mask.trailing_zeros() as usize;
            let block = self.current >> (shift + SLOT_BITS as usize) << (shift + SLOT_BITS as usize);
            let start = (block | ((slot as u64) << shift)).max(self.current);
            if best.is_none_or(|b| start < b.2) {
                best = Some((level, slot, start));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn us(x: u64) -> Instant {
        Instant::from_micros(x)
    }

    #[test]
    fn fires_at_the_right_tick_across_levels() {
        let mut w = TimerWheel::new(64, us(10));
        for d in [0u64, 1, 63, 64, 65, 4095, 4096, 262_143, 262_144, 300_000_000] {
            w.insert(us(10 + d), d).unwrap();
        }
        assert_eq!(w.len(), 10);
        let mut fired = Vec::new();
        for t in [10u64, 11, 72, 73, 74, 75, 4105, 4106, 262_153, 262_154, 300_000_009, 300_000_010] {
            let before = fired.len();
            w.expire(us(t), |v| fired.push((t, v)));
            // Nothing fires before its deadline.
            for &(at, v) in &fired[before..] {
                assert!(10 + v <= at, "{v} fired at {at}");
            }
        }
        let at: Vec<(u64, u64)> = fired.clone();
        assert_eq!(
            at,
            vec![
                (10, 0),
                (11, 1),
                (73, 63),
                (74, 64),
                (75, 65),
                (4105, 4095),
                (4106, 4096),
                (262_153, 262_143),
                (262_154, 262_144),
                (300_000_010, 300_000_000)
            ]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_and_stale_handles() {
        let mut w = TimerWheel::new(2, us(0));
        let a = w.insert(us(100), 'a').unwrap();
        let b = w.insert(us(5000), 'b').unwrap();
        assert_eq!(w.insert(us(1), 'c'), Err(Full));
        assert_eq!(w.cancel(a), Some('a'));
        assert_eq!(w.cancel(a), None);
        let c = w.insert(us(7), 'c').unwrap();
        assert_eq!(c.index, a.index, "slot reused");
        assert_eq!(w.cancel(a), None, "stale handle does not cancel the new timer");
        let mut got = Vec::new();
        w.expire(us(10_000), |v| got.push(v));
        assert_eq!(got, vec!['c', 'b']);
        assert_eq!(w.cancel(b), None);
    }

    #[test]
    fn next_deadline_is_a_lower_bound() {
        let mut w = TimerWheel::new(8, us(0));
        assert_eq!(w.next_deadline(), None);
        w.insert(us(30), 1).unwrap();
        assert_eq!(w.next_deadline(), Some(us(30)));
        w.insert(us(1_000_000), 2).unwrap();
        w.expire(us(40), |_| {});
        let nd = w.next_deadline().unwrap();
        assert!(nd <= us(1_000_000) && nd > us(40), "{nd:?}");
        // Turns with nothing due (the one-comparison path) leave it as exact as it was.
        for t in 41..200 {
            assert!(!w.may_expire(us(t)));
            assert_eq!(w.expire(us(t), |_| {}), 0);
            assert_eq!(w.next_deadline(), Some(nd));
        }
        let mut got = Vec::new();
        assert!(w.may_expire(us(1_000_000)));
        w.expire(us(1_000_000), |v| got.push(v));
        assert_eq!(got, vec![2]);
        assert_eq!(w.next_deadline(), None);
    }

    /// Randomised against a model: every timer fires exactly once, in the first `expire` whose
    /// time reaches its deadline, and cancelled timers never fire.
    #[test]
    fn matches_a_model() {
        let mut rng = 0x1234_5678u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut w = TimerWheel::new(4096, us(0));
        let mut model: BTreeMap<u64, (u64, TimerId)> = BTreeMap::new();
        let mut now = 0u64;
        let mut id = 0u64;
        for _ in 0..20_000 {
            match next() % 10 {
                0..=5 => {
                    if model.len() < 4000 {
                        let span = [64u64, 4096, 262_144, 20_000_000][(next() % 4) as usize];
                        let at = now + next() % span;
                        let h = w.insert(us(at), id).unwrap();
                        model.insert(id, (at, h));
                        id += 1;
                    }
                }
                6 => {
                    if let Some((&k, &(_, h))) = model.iter().nth((next() % 7) as usize) {
                        assert_eq!(w.cancel(h), Some(k));
                        model.remove(&k);
                    }
                }
                _ => {
                    now += next() % [3u64, 100, 5000, 1_000_000][(next() % 4) as usize];
                    let mut fired = Vec::new();
                    let may = w.may_expire(us(now));
                    w.expire(us(now), |v| fired.push(v));
                    assert!(may || fired.is_empty(), "may_expire said no at {now}, then {fired:?} fired");
                    let mut due: Vec<u64> = model.iter().filter(|(_, &(at, _))| at <= now).map(|(&k, _)| k).collect();
                    fired.sort();
                    due.sort();
                    assert_eq!(fired, due, "at {now}");
                    for k in due {
                        model.remove(&k);
                    }
                }
            }
            assert_eq!(w.len(), model.len());
            let first = model.values().map(|&(at, _)| at).min();
            assert!(w.next_deadline() <= first.map(us), "{:?} is past the first deadline {first:?}", w.next_deadline());
            assert_eq!(w.next_deadline().is_none(), first.is_none());
        }
    }
}
