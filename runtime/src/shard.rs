//! The shard: one thread running a statically wired pipeline to completion, forever.

use crate::clock::Clock;
use crate::idle::{IdlePolicy, Parker, Waker};
use crate::stage::{StageStats, Work};
use machnet_net::time::Instant;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// An adaptive shard that spins yields at least this often (ns): a co-located application (or
/// anything else) waiting for the CPU gets it within microseconds; on a core of its own a yield
/// returns at once.
const SPIN_YIELD_EVERY_NS: u64 = 5_000;

/// A shard's stages, wired statically: `poll` calls each stage in order through
/// [`Recorder::run`], which keeps per-stage counters.
pub trait Pipeline: Send + 'static {
    /// Names of the stages, in the order `poll` runs them (their indices in `Recorder::run`).
    const STAGES: &'static [&'static str];

    /// Called once on the shard's thread before the first poll, with the clock the loop reads
    /// for `poll`'s `now`: a stage that needs the time later in a turn (after a long stage)
    /// reads a clone of it, so its readings and the loop's agree.
    fn start(&mut self, _clock: &Clock) {}

    /// Polls every stage once.
    fn poll(&mut self, now: Instant, rec: &mut Recorder) -> Work;

    /// The earliest time a stage needs to run even without input (its next timer).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Called with the shard marked sleeping, just before it parks: publish "engine sleeping"
    /// flags and re-check every input. Return `false` if work arrived (the park is skipped).
    fn before_park(&mut self) -> bool {
        true
    }

    /// Called after parking (or after a skipped park): clear the flags set by `before_park`.
    fn after_park(&mut self) {}

    /// The shard may stop (checked after every poll).
    fn done(&self) -> bool {
        false
    }

    /// Called after the loop ends, before the thread returns the pipeline.
    fn shutdown(&mut self, _now: Instant) {}
}

/// How a shard runs.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Thread name.
    pub name: String,
    /// Core to pin to, if any.
    pub core: Option<usize>,
    /// Idle policy.
    pub idle: IdlePolicy,
    /// A poll (or loop iteration) longer than this counts as a stall.
    pub stall_threshold: Duration,
    /// Stage timing is measured on one loop in this many (counts are always exact).
    pub timing_every: u32,
    /// How often the statistics snapshot is refreshed.
    pub publish_every: Duration,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            name: "shard".into(),
            core: None,
            idle: IdlePolicy::ADAPTIVE,
            stall_threshold: Duration::from_millis(1),
            timing_every: 16,
            publish_every: Duration::from_millis(10),
        }
    }
}

/// Counters of the shard as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Loop iterations.
    pub loops: u64,
    /// Iterations in which no stage did work.
    pub idle_loops: u64,
    /// `sched_yield` calls.
    pub yields: u64,
    /// Parks.
    pub parks: u64,
    /// Parks ended by a wake-up rather than the timeout.
    pub woken: u64,
    /// Nanoseconds parked.
    pub parked_ns: u64,
    /// Iterations that took longer than the stall threshold (parks excluded).
    pub stalls: u64,
    /// Longest iteration (parks excluded), ns.
    pub max_loop_ns: u64,
    /// Where the time of the longest iteration went, from the thread's scheduler statistics
    /// over the publish window that held it (see [`LongLoop`]).
    pub max_loop: LongLoop,
    /// CPU time the shard thread ran, ns (the kernel's count).
    pub cpu_ns: u64,
    /// Time the shard thread was runnable but waited for a CPU, ns (the kernel's count: other
    /// processes had the CPU).
    pub runqueue_ns: u64,
}

/// The publish window (about `publish_every`) that held a shard's longest loop iteration, as
/// the kernel accounted the shard thread's time in it (`/proc/thread-self/schedstat`). A long
/// iteration with `waited_ns` near its length was the guest's scheduler running other
/// processes; with `ran_ns` near it, the shard's own work; with neither (the window's wall time
/// far above `ran + waited + parked`), the CPU itself was taken away (the host preempted the
/// virtual CPU: steal time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LongLoop {
    /// Wall time of the window, ns.
    pub window_ns: u64,
    /// CPU time the thread ran in it, ns.
    pub ran_ns: u64,
    /// Time it waited for a CPU in it, ns.
    pub waited_ns: u64,
    /// Time it was parked (sleeping by its own choice) in it, ns.
    pub parked_ns: u64,
}

/// Reads this thread's `/proc/thread-self/schedstat`: CPU time and run-queue wait, ns.
#[derive(Debug)]
struct SchedStat {
    file: Option<std::fs::File>,
}

impl SchedStat {
    fn open() -> Self {
        SchedStat { file: std::fs::File::open("/proc/thread-self/schedstat").ok() }
    }

    /// (ran, waited), ns; zeros where the kernel does not keep them. No allocation.
    fn read(&mut self) -> (u64, u64) {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else { return (0, 0) };
        let mut buf = [0u8; 96];
        let Ok(n) = f.read_at(&mut buf, 0) else { return (0, 0) };
        let mut it = buf[..n].split(|b| b.is_ascii_whitespace()).filter(|x| !x.is_empty()).map(|x| {
            x.iter().try_fold(0u64, |a, &d| d.is_ascii_digit().then(|| a * 10 + u64::from(d - b'0'))).unwrap_or(0)
        });
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }
}

/// A snapshot of a shard's statistics, refreshed by the shard and read by anyone.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    /// Shard name.
    pub name: String,
    /// Stage names and counters (stage timing is sampled: see [`ShardConfig::timing_every`];
    /// times here are scaled estimates).
    pub stages: Vec<(&'static str, StageStats)>,
    /// Loop counters.
    pub loops: LoopStats,
    /// Time since the shard started.
    pub uptime: Duration,
}

/// Per-stage bookkeeping handed to [`Pipeline::poll`].
#[derive(Debug)]
pub struct Recorder {
    stats: Vec<StageStats>,
    timing: bool,
    scale: u64,
    stall_ns: u64,
    clock: Clock,
}

impl Recorder {
    /// A recorder for driving a pipeline by hand (embedded mode, tests): counts only, no
    /// timing.
    pub fn standalone(stages: usize) -> Self {
        let cfg = ShardConfig { timing_every: u32::MAX, ..ShardConfig::default() };
        Recorder::new(stages, &cfg, Clock::monotonic())
    }

    fn new(stages: usize, cfg: &ShardConfig, clock: Clock) -> Self {
        Recorder {
            stats: vec![StageStats::default(); stages],
            timing: false,
            scale: u64::from(cfg.timing_every.max(1)),
            stall_ns: u64::try_from(cfg.stall_threshold.as_nanos()).unwrap_or(u64::MAX),
            clock,
        }
    }

    /// Runs stage `index` (its position in [`Pipeline::STAGES`]) and records the result.
    #[inline]
    pub fn run(&mut self, index: usize, _now: Instant, f: impl FnOnce() -> Work) -> Work {
        if !self.timing {
            let w = f();
            let s = &mut self.stats[index];
            s.polls += 1;
            if !w.is_idle() {
                s.busy_polls += 1;
                s.work += u64::from(w.0);
            }
            return w;
        }
        let t0 = self.clock.now();
        let w = f();
        let ns = self.clock.now().as_nanos() - t0.as_nanos();
        let s = &mut self.stats[index];
        s.polls += 1;
        if w.is_idle() {
            s.idle_ns += ns * self.scale;
        } else {
            s.busy_polls += 1;
            s.work += u64::from(w.0);
            s.busy_ns += ns * self.scale;
        }
        if ns > self.stall_ns {
            s.stalls += 1;
        }
        s.max_poll_ns = s.max_poll_ns.max(ns);
        w
    }

    /// The counters so far.
    pub fn stats(&self) -> &[StageStats] {
        &self.stats
    }
}

/// A running shard.
#[derive(Debug)]
pub struct Shard<P: Pipeline> {
    handle: JoinHandle<P>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    stats: Arc<Mutex<ShardStats>>,
}

impl<P: Pipeline> Shard<P> {
    /// Starts a shard thread running `pipeline`.
    pub fn spawn(cfg: ShardConfig, pipeline: P) -> io::Result<Self> {
        let parker = Parker::new()?;
        Self::spawn_with(cfg, pipeline, parker)
    }

    /// Starts a shard with a parker prepared by the caller (fds already registered).
    pub fn spawn_with(cfg: ShardConfig, mut pipeline: P, parker: Parker) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let waker = parker.waker();
        let stats = Arc::new(Mutex::new(ShardStats {
            name: cfg.name.clone(),
            stages: P::STAGES.iter().map(|n| (*n, StageStats::default())).collect(),
            ..ShardStats::default()
        }));
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let handle = std::thread::Builder::new().name(cfg.name.clone()).spawn(move || {
            if let Some(core) = cfg.core {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    log::warn!("{}: could not pin to core {core}", cfg.name);
                }
            }
            run(&cfg, &mut pipeline, &parker, &stop2, &stats2);
            pipeline
        })?;
        Ok(Shard { handle, stop, waker, stats })
    }

    /// Wakes the shard if it is parked (after giving it work through some shared queue).
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// The latest statistics snapshot (at most `publish_every` old).
    pub fn stats(&self) -> ShardStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A handle to the snapshot, for a controller that outlives this handle.
    pub fn stats_handle(&self) -> Arc<Mutex<ShardStats>> {
        self.stats.clone()
    }

    /// Asks the shard to stop after its current iteration.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.force();
    }

    /// Asks the shard to stop and waits for it; returns the pipeline.
    pub fn join(self) -> std::thread::Result<P> {
        self.handle.join()
    }

    /// `stop` then `join`.
    pub fn stop_and_join(self) -> std::thread::Result<P> {
        self.stop();
        self.join()
    }
}

fn run<P: Pipeline>(cfg: &ShardConfig, p: &mut P, parker: &Parker, stop: &AtomicBool, shared: &Mutex<ShardStats>) {
    let mut clock = Clock::new();
    p.start(&clock);
    let mut rec = Recorder::new(P::STAGES.len(), cfg, clock.clone());
    let mut loops = LoopStats::default();
    let start = clock.now();
    let stall_ns = u64::try_from(cfg.stall_threshold.as_nanos()).unwrap_or(u64::MAX);
    let publish_ns = u64::try_from(cfg.publish_every.as_nanos()).unwrap_or(u64::MAX);
    let every = u64::from(cfg.timing_every.max(1));
    let mut idle_since: Option<Instant> = None;
    let mut last_yield = start;
    let mut last_publish = start;
    let mut now = start;
    let mut sched = SchedStat::open();
    let (mut ran0, mut waited0) = sched.read();
    let mut parked0 = 0u64;
    // The longest iteration of the current publish window, and of all windows so far.
    let mut window_max = 0u64;
    loop {
        rec.timing = loops.loops % every == 0;
        let work = p.poll(now, &mut rec);
        loops.loops += 1;
        if stop.load(Ordering::Acquire) || p.done() {
            break;
        }
        let after = clock.now();
        let ns = after.as_nanos() - now.as_nanos();
        if ns > stall_ns {
            loops.stalls += 1;
        }
        window_max = window_max.max(ns);
        now = after;
        if work.is_idle() {
            loops.idle_loops += 1;
            let since = *idle_since.get_or_insert(now);
            if let IdlePolicy::Adaptive { spin, yield_for, max_park } = cfg.idle {
                let idle = now - since;
                if idle >= spin + yield_for {
                    let mut timeout = max_park;
                    if let Some(d) = p.next_deadline() {
                        timeout = timeout.min(d.saturating_since(now));
                    }
                    if !timeout.is_zero() {
                        parker.prepare();
                        if p.before_park() {
                            loops.parks += 1;
                            if parker.park(timeout) {
                                loops.woken += 1;
                            }
                        } else {
                            parker.cancel();
                        }
                        p.after_park();
                        let woke = clock.now();
                        loops.parked_ns += woke.as_nanos() - now.as_nanos();
                        now = woke;
                    }
                } else if idle >= spin || now.as_nanos() - last_yield.as_nanos() >= SPIN_YIELD_EVERY_NS {
                    // Even while spinning, give the CPU away now and then: an application on
                    // this CPU that the shard just handed a message would otherwise wait for
                    // the end of the spin (or the scheduler's tick) to read it.
                    loops.yields += 1;
                    std::thread::yield_now();
                    now = clock.now();
                    last_yield = now;
                } else {
                    core::hint::spin_loop();
                }
            } else {
                core::hint::spin_loop();
            }
        } else {
            idle_since = None;
        }
        if now.as_nanos() - last_publish.as_nanos() >= publish_ns {
            let (ran, waited) = sched.read();
            if window_max > loops.max_loop_ns {
                loops.max_loop_ns = window_max;
                loops.max_loop = LongLoop {
                    window_ns: now.as_nanos() - last_publish.as_nanos(),
                    ran_ns: ran.saturating_sub(ran0),
                    waited_ns: waited.saturating_sub(waited0),
                    parked_ns: loops.parked_ns - parked0,
                };
            }
            loops.cpu_ns = ran;
            loops.runqueue_ns = waited;
            (ran0, waited0, parked0, window_max) = (ran, waited, loops.parked_ns, 0);
            last_publish = now;
            // Never wait for a reader: skip this refresh if the snapshot is being read.
            if let Ok(mut s) = shared.try_lock() {
                for (dst, src) in s.stages.iter_mut().zip(rec.stats()) {
                    dst.1 = *src;
                }
                s.loops = loops;
                s.uptime = now - start;
            }
        }
    }
    let end = clock.now();
    loops.max_loop_ns = loops.max_loop_ns.max(window_max);
    p.shutdown(end);
    if let Ok(mut s) = shared.lock() {
        for (dst, src) in s.stages.iter_mut().zip(rec.stats()) {
            dst.1 = *src;
        }
        s.loops = loops;
        s.uptime = end - start;
    }
}
