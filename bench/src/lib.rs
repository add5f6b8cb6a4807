//! A small benchmark harness: repeated timed runs, medians with min and max, and tables that
//! put every result next to a baseline measured in the same invocation.
//!
//! Benchmarks are programs, not tests: nothing here asserts a time.
#![warn(missing_docs)]

pub mod rpc;

use std::time::Instant;

/// One measured operation: nanoseconds per operation over several runs.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was measured.
    pub name: String,
    /// Median of the runs.
    pub median: f64,
    /// Fastest run.
    pub min: f64,
    /// Slowest run.
    pub max: f64,
}

/// Times `runs` runs of `iters` calls of `f` and returns ns per call. `f` returns a value that
/// is passed through `black_box` so the work cannot be optimised away.
pub fn measure<T>(name: &str, iters: u64, runs: usize, mut f: impl FnMut(u64) -> T) -> Sample {
    // Warm-up: one run's worth.
    for i in 0..iters.min(100_000) {
        std::hint::black_box(f(i));
    }
    let mut per_op: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            for i in 0..iters {
                std::hint::black_box(f(i));
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per_op.sort_by(|a, b| a.total_cmp(b));
    Sample { name: name.to_string(), median: per_op[per_op.len() / 2], min: per_op[0], max: per_op[per_op.len() - 1] }
}

/// Renders samples as a markdown table with each one's ratio to `baseline` (median / median).
pub fn table(samples: &[Sample], baseline: &Sample) -> String {
    let mut s = String::from("| operation | median ns/op | min | max | × baseline |\n|---|---:|---:|---:|---:|\n");
    for x in samples {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            x.name,
            x.median,
            x.min,
            x.max,
            x.median / baseline.median
        ));
    }
    s.push_str(&format!("\nbaseline: {} = {:.1} ns/op\n", baseline.name, baseline.median));
    s
}

/// One line describing the machine (CPU model, cores, kernel), for reports.
pub fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}
