//! A shard-per-core, run-to-completion runtime.
//!
//! A shard is one thread, optionally pinned to a core, that loops over a statically wired
//! [`Pipeline`](shard::Pipeline) of stages — a struct of concrete stage types that polls each
//! in order. No `dyn`, no async, no locks and no allocation in the loop. Around it the runtime
//! provides:
//!
//! * [`clock`]: a cheap monotonic clock (TSC calibrated against `CLOCK_MONOTONIC` where the
//!   TSC is invariant, otherwise `CLOCK_MONOTONIC` itself);
//! * [`wheel`]: a hierarchical timing wheel with microsecond resolution and O(1) insert and
//!   cancel;
//! * [`stage`]: the [`Stage`](stage::Stage) trait and per-stage counters (polls, work items,
//!   time, stalls);
//! * [`idle`]: the idle policy — `busy` spinning, or `adaptive`: spin, then yield, then park on
//!   an eventfd that doorbells and the controller ring;
//! * [`shard`]: the thread: pinning, the loop, stall detection and statistics snapshots that a
//!   controller reads without ever stalling the shard.
//!
//! # Example
//!
//! ```
//! use machnet_runtime::shard::{Pipeline, Recorder, Shard, ShardConfig};
//! use machnet_runtime::stage::{Stage, Work};
//! use machnet_net::time::Instant;
//!
//! struct Counter(u64);
//! impl Stage<()> for Counter {
//!     fn poll(&mut self, _now: Instant, _ctx: &mut ()) -> Work {
//!         self.0 += 1;
//!         Work(1)
//!     }
//! }
//!
//! struct Pipe { counter: Counter }
//! impl Pipeline for Pipe {
//!     const STAGES: &'static [&'static str] = &["counter"];
//!     fn poll(&mut self, now: Instant, rec: &mut Recorder) -> Work {
//!         rec.run(0, now, || self.counter.poll(now, &mut ()))
//!     }
//!     fn done(&self) -> bool { self.counter.0 >= 1000 }
//! }
//!
//! let shard = Shard::spawn(ShardConfig::default(), Pipe { counter: Counter(0) }).unwrap();
//! let pipe = shard.join().unwrap();
//! assert_eq!(pipe.counter.0, 1000);
//! ```
#![warn(missing_docs)]

pub mod clock;
pub mod idle;
pub mod shard;
pub mod stage;
pub mod wheel;
