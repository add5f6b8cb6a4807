//! A seeded fault injector that wraps any [`Port`] on its transmit side.
//!
//! Every frame handed to [`Faulty::tx_burst`] may be dropped, duplicated, corrupted (one byte
//! at or after the IPv4 header; the Ethernet FCS would catch damage before it), delayed (fixed
//! delay plus uniform jitter, which reorders), held back for extra reordering, and paced
//! through a rate-limited bottleneck with a tail-drop queue (which creates queueing delay).
//! Frames are released to the wrapped port when their time comes; time is whatever the caller
//! last passed to [`Faulty::set_now`] (virtual time in simulations, the shard clock in a
//! daemon), and [`Faulty::next_release`] says when the next held frame is due.
//!
//! The same seed and the same sequence of calls give the same faults.

use super::{Burst, Capabilities, PacketBuf, Port, PortStats};
use crate::time::Instant;
use alloc::collections::VecDeque;
use core::time::Duration;

/// What to inject. Probabilities are per frame, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Seed of the pseudo-random generator.
    pub seed: u64,
    /// Probability of dropping a frame.
    pub drop: f64,
    /// Probability of sending a frame twice.
    pub duplicate: f64,
    /// Probability of flipping one byte after the Ethernet header.
    pub corrupt: f64,
    /// Probability of holding a frame back by `reorder_delay` so later frames overtake it.
    pub reorder: f64,
    /// Extra delay of a reordered frame.
    pub reorder_delay: Duration,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Uniform random extra delay in [0, jitter).
    pub jitter: Duration,
    /// Bottleneck rate in bits per second (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops arrivals (tail drop).
    pub queue_bytes: usize,
    /// Frames the injector can hold at once; beyond that, frames are dropped.
    pub hold_capacity: usize,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 1,
            drop: 0.0,
            duplicate: 0.0,
            corrupt: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_micros(20),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            queue_bytes: 256 * 1024,
            hold_capacity: 8192,
        }
    }
}

/// Counts of injected faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Frames offered.
    pub offered: u64,
    /// Dropped by the loss probability.
    pub dropped: u64,
    /// Dropped by the bottleneck queue or the hold capacity.
    pub queue_drops: u64,
    /// Duplicates created.
    pub duplicated: u64,
    /// Frames corrupted.
    pub corrupted: u64,
    /// Frames held back for reordering.
    pub reordered: u64,
    /// Frames released to the wrapped port.
    pub released: u64,
}

/// SplitMix64: small, fast, good enough for fault decisions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// True with probability `p`.
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    /// Uniform in [0, n) (0 when n is 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

struct Held<B> {
    at: Instant,
    buf: B,
}

/// A port wrapped by a fault injector.
pub struct Faulty<P: Port> {
    inner: P,
    cfg: FaultConfig,
    rng: Rng,
    now: Instant,
    /// Sorted by (release time, arrival order).
    held: VecDeque<Held<P::Buf>>,
    /// When the bottleneck finishes serialising what it has accepted.
    link_free_at: Instant,
    release: Burst<P::Buf>,
    fstats: FaultStats,
}

impl<P: Port> Faulty<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, cfg: FaultConfig) -> Self {
        Faulty {
            inner,
            rng: Rng::new(cfg.seed),
            now: Instant::ZERO,
            held: VecDeque::with_capacity(cfg.hold_capacity),
            link_free_at: Instant::ZERO,
            release: Burst::new(),
            fstats: FaultStats::default(),
            cfg,
        }
    }
    /// Sets the current time and releases frames that are due.
    pub fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.flush_due();
    }
    /// The current time as last set.
    pub fn now(&self) -> Instant {
        self.now
    }
    /// When the next held frame is due, if any.
    pub fn next_release(&self) -> Option<Instant> {
        self.held.front().map(|h| h.at)
    }
    /// Frames held.
    pub fn held(&self) -> usize {
        self.held.len()
    }
    /// Injection counters.
    pub fn fault_stats(&self) -> FaultStats {
        self.fstats
    }
    /// Changes the configuration (keeps the generator state and the held frames).
    pub fn set_config(&mut self, cfg: FaultConfig) {
        self.cfg = cfg;
    }
    /// The wrapped port.
    pub fn inner(&self) -> &P {
        &self.inner
    }
    /// The wrapped port, mutable.
    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }

    fn hold(&mut self, buf: P::Buf, at: Instant) {
        if self.held.len() >= self.cfg.hold_capacity {
            self.fstats.queue_drops += 1;
            self.inner.free(buf);
            return;
        }
        // Most frames are due last: search from the back; ties keep arrival order.
        let mut pos = self.held.len();
        while pos > 0 && self.held[pos - 1].at > at {
            pos -= 1;
        }
        self.held.insert(pos, Held { at, buf });
    }

    fn offer(&mut self, mut buf: P::Buf) {
        self.fstats.offered += 1;
        if self.rng.chance(self.cfg.drop) {
            self.fstats.dropped += 1;
            self.inner.free(buf);
            return;
        }
        if self.rng.chance(self.cfg.corrupt) && buf.len() > 14 {
            let at = 14 + self.rng.below(buf.len() as u64 - 14) as usize;
            let flip = 1 + self.rng.below(255) as u8;
            buf.frame_mut()[at] ^= flip;
            self.fstats.corrupted += 1;
        }
        if self.rng.chance(self.cfg.duplicate) {
            if let Some(mut d) = self.inner.alloc() {
                let n = buf.len();
                d.storage_mut()[..n].copy_from_slice(buf.frame());
                d.set_len(n);
                self.fstats.duplicated += 1;
                self.schedule(d);
            }
        }
        self.schedule(buf);
    }

    /// Passes a frame through the bottleneck and the delay line.
    fn schedule(&mut self, buf: P::Buf) {
        let mut depart = self.now;
        if let Some(rate) = self.cfg.rate_bps.filter(|&r| r > 0) {
            let backlog_ns = self.link_free_at.as_nanos().saturating_sub(self.now.as_nanos());
            let backlog_bytes = (u128::from(backlog_ns) * u128::from(rate) / 8_000_000_000) as usize;
            if backlog_bytes + buf.len() > self.cfg.queue_bytes {
                self.fstats.queue_drops += 1;
                self.inner.free(buf);
                return;
            }
            let tx_ns = (buf.len() as u64 * 8 * 1_000_000_000) / rate;
            depart = self.link_free_at.max(self.now) + Duration::from_nanos(tx_ns);
            self.link_free_at = depart;
        }
        let mut at = depart + self.cfg.delay;
        let jitter = u64::try_from(self.cfg.jitter.as_nanos()).unwrap_or(u64::MAX);
        if jitter > 0 {
            at += Duration::from_nanos(self.rng.below(jitter));
        }
        if self.rng.chance(self.cfg.reorder) {
            at += self.cfg.reorder_delay;
            self.fstats.reordered += 1;
        }
        self.hold(buf, at);
    }

    fn flush_due(&mut self) {
        loop {
            while self.release.len() < self.release.capacity() {
                match self.held.front() {
                    Some(h) if h.at <= self.now => {
                        let h = self.held.pop_front().expect("front exists");
                        self.release.push(h.buf);
                    }
                    _ => break,
                }
            }
            if self.release.is_empty() {
                return;
            }
            let before = self.release.len();
            let sent = self.inner.tx_burst(&mut self.release);
            self.fstats.released += sent as u64;
            if sent < before {
                // The wrapped port is full: keep the rest for the next call.
                return;
            }
        }
    }
}

impl<P: Port> Port for Faulty<P> {
    type Buf = P::Buf;

    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    fn alloc(&mut self) -> Option<P::Buf> {
        self.inner.alloc()
    }
    fn free(&mut self, buf: P::Buf) {
        self.inner.free(buf)
    }
    fn rx_burst(&mut self, out: &mut Burst<P::Buf>) -> usize {
        self.flush_due();
        self.inner.rx_burst(out)
    }
    fn tx_burst(&mut self, pkts: &mut Burst<P::Buf>) -> usize {
        let n = pkts.len();
        for b in pkts.drain(..) {
            self.offer(b);
        }
        self.flush_due();
        n
    }
    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
    fn set_time(&mut self, now: Instant) {
        self.set_now(now);
    }
    fn next_event(&self) -> Option<Instant> {
        self.next_release()
    }
    fn fault_stats(&self) -> Option<FaultStats> {
        Some(self.fstats)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::super::mem::{pair, MemConfig, MemPort};
    use super::*;
    use crate::wire::EthernetAddress;

    fn setup(cfg: FaultConfig) -> (Faulty<MemPort>, MemPort) {
        let (a, b) = pair(MemConfig::default(), EthernetAddress::ZERO, EthernetAddress::ZERO);
        (Faulty::new(a, cfg), b)
    }

    fn send(tx: &mut Faulty<MemPort>, id: u32, len: usize) {
        let mut f = tx.alloc().unwrap();
        f.storage_mut()[..len].fill(0);
        f.storage_mut()[20..24].copy_from_slice(&id.to_le_bytes());
        f.set_len(len);
        let mut burst = Burst::new();
        burst.push(f);
        tx.tx_burst(&mut burst);
    }

    fn drain(rx: &mut MemPort) -> Vec<u32> {
        let mut out = Vec::new();
        let mut burst = Burst::new();
        while rx.rx_burst(&mut burst) > 0 {
            for f in burst.drain(..) {
                out.push(u32::from_le_bytes(f.frame()[20..24].try_into().unwrap()));
                rx.free(f);
            }
        }
        out
    }

    #[test]
    fn drop_rate_is_close_to_configured_and_seeded() {
        let run = |seed| {
            let (mut tx, mut rx) = setup(FaultConfig { seed, drop: 0.2, ..FaultConfig::default() });
            let mut got = Vec::new();
            for i in 0..10_000 {
                send(&mut tx, i, 64);
                got.extend(drain(&mut rx));
            }
            got
        };
        let a = run(7);
        assert!((7_700..8_300).contains(&a.len()), "delivered {}", a.len());
        assert!(a.windows(2).all(|w| w[0] < w[1]), "no reordering configured");
        assert_eq!(a, run(7), "same seed, same faults");
        assert_ne!(a, run(8));
    }

    #[test]
    fn delay_holds_until_due_and_jitter_reorders() {
        let (mut tx, mut rx) = setup(FaultConfig {
            delay: Duration::from_micros(10),
            jitter: Duration::from_micros(5),
            ..FaultConfig::default()
        });
        for i in 0..200 {
            send(&mut tx, i, 64);
        }
        assert!(drain(&mut rx).is_empty());
        assert!(tx.next_release().unwrap() >= Instant::from_micros(10));
        tx.set_now(Instant::from_micros(9));
        assert!(drain(&mut rx).is_empty());
        tx.set_now(Instant::from_micros(15));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 200);
        assert!(got.windows(2).any(|w| w[0] > w[1]), "jitter reorders");
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn duplicates_and_corruption() {
        let (mut tx, mut rx) = setup(FaultConfig { duplicate: 0.5, corrupt: 1.0, ..FaultConfig::default() });
        for i in 0..1000 {
            send(&mut tx, i, 1000);
        }
        let mut burst = Burst::new();
        let mut frames = 0;
        let mut intact = 0;
        while rx.rx_burst(&mut burst) > 0 {
            for f in burst.drain(..) {
                frames += 1;
                // Every frame had one byte (at offset >= 14) flipped; the Ethernet header is intact.
                assert!(f.frame()[..14].iter().all(|&b| b == 0));
                if f.frame()[14..].iter().filter(|&&b| b != 0).count() <= 4 {
                    intact += 1;
                }
                rx.free(f);
            }
        }
        let st = tx.fault_stats();
        assert_eq!(st.corrupted, 1000);
        assert!((400..600).contains(&st.duplicated), "{st:?}");
        assert_eq!(frames as u64, 1000 + st.duplicated);
        assert!(intact > 0);
    }

    #[test]
    fn bottleneck_paces_and_tail_drops() {
        // 1 Gbit/s: a 1250-byte frame takes 10 us; the queue holds four frames.
        let (mut tx, mut rx) =
            setup(FaultConfig { rate_bps: Some(1_000_000_000), queue_bytes: 5_000, ..FaultConfig::default() });
        for i in 0..10 {
            send(&mut tx, i, 1250);
        }
        let st = tx.fault_stats();
        assert_eq!(st.queue_drops, 6, "{st:?}");
        tx.set_now(Instant::from_micros(10));
        assert_eq!(drain(&mut rx), vec![0]);
        tx.set_now(Instant::from_micros(40));
        assert_eq!(drain(&mut rx), vec![1, 2, 3]);
        assert_eq!(tx.next_release(), None);
    }
}
