//! plot: draws the scenario runner's results (`scenario ... --out FILE`) as SVG charts.
//!
//! ```text
//! cargo run --release -p machnet-bench --bin plot -- --out docs/img bench/results/*.json
//! ```
//!
//! For every results file: `<scenario>_latency.svg` (median RTT p50 as bars, p99 and p99.9 as
//! markers, per configuration and system, log scale) and `<scenario>_rps.svg` (median RPC/s).

use clap::Parser;
use plotters::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "plot", version, about = "Charts from scenario results")]
struct Args {
    /// Output directory.
    #[arg(long, default_value = "docs/img")]
    out: PathBuf,
    /// Results files written by `scenario --out`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct Results {
    scenario: String,
    machine: String,
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    system: String,
    msg_size: usize,
    window: u64,
    totals: machnet_bench::rpc::Totals,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per configuration (size, window), per system: medians of (p50, p99, p99.9, RPC/s).
type Table = BTreeMap<(usize, u64), BTreeMap<String, [f64; 4]>>;
/// The same, every run.
type Runs = BTreeMap<(usize, u64), BTreeMap<String, Vec<[f64; 4]>>>;

fn table(r: &Results) -> Table {
    let mut raw: Runs = BTreeMap::new();
    for x in &r.records {
        let t = &x.totals;
        raw.entry((x.msg_size, x.window)).or_default().entry(x.system.clone()).or_default().push([
            t.rtt_p50_us,
            t.rtt_p99_us,
            t.rtt_p999_us,
            t.rps,
        ]);
    }
    raw.into_iter()
        .map(|(k, systems)| {
            let s = systems
                .into_iter()
                .map(|(name, runs)| {
                    let col = |i: usize| median(runs.iter().map(|r| r[i]).collect());
                    (name, [col(0), col(1), col(2), col(3)])
                })
                .collect();
            (k, s)
        })
        .collect()
}

fn label(size: usize, window: u64) -> String {
    let s = if size >= 1024 && size % 1024 == 0 { format!("{} KiB", size / 1024) } else { format!("{size} B") };
    format!("{s}, window {window}")
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Grouped bars on a log axis: one group per configuration, one bar per system; `value` picks
/// the bar height and `marks` the extra markers (p99, p99.9).
fn chart(
    path: &PathBuf,
    title: &str,
    y_desc: &str,
    t: &Table,
    value: impl Fn(&[f64; 4]) -> f64,
    marks: impl Fn(&[f64; 4]) -> Vec<f64>,
) -> Result<(), String> {
    let systems: Vec<String> = {
        let mut v: Vec<String> = t.values().flat_map(|s| s.keys().cloned()).collect();
        v.sort();
        v.dedup();
        // The system under test first.
        v.sort_by_key(|n| (!n.starts_with("machnet"), n.clone()));
        v
    };
    let all: Vec<f64> =
        t.values().flat_map(|s| s.values().flat_map(|v| marks(v).into_iter().chain([value(v)]))).collect();
    let lo = all.iter().cloned().filter(|x| *x > 0.0).fold(f64::MAX, f64::min).max(1e-3);
    let hi = all.iter().cloned().fold(0.0, f64::max).max(lo * 10.0);
    let (lo, hi) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
    let groups: Vec<(usize, u64)> = t.keys().cloned().collect();
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups.len() as f64, (lo..hi).log_scale())
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < groups.len() {
                label(groups[i].0, groups[i].1)
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / systems.len() as f64;
    for (si, name) in systems.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let mut bars = Vec::new();
        let mut dots = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            if let Some(v) = t[g].get(name) {
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                bars.push(Rectangle::new([(x0, lo), (x0 + width * 0.9, value(v).max(lo))], color.filled()));
                for m in marks(v) {
                    dots.push((x0 + width * 0.45, m.max(lo)));
                }
            }
        }
        c.draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        c.draw_series(dots.into_iter().map(|p| Circle::new(p, 3, BLACK.filled()))).map_err(|e| e.to_string())?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    for f in &args.files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let r: Results = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let t = table(&r);
        let lat = args.out.join(format!("{}_latency.svg", r.scenario));
        chart(
            &lat,
            &format!("{}: RTT p50 (bars), p99 and p99.9 (dots) — {}", r.scenario, r.machine),
            "µs (log)",
            &t,
            |v| v[0],
            |v| vec![v[1], v[2]],
        )?;
        let rps = args.out.join(format!("{}_rps.svg", r.scenario));
        chart(&rps, &format!("{}: RPC/s — {}", r.scenario, r.machine), "RPC/s (log)", &t, |v| v[3], |_| Vec::new())?;
        eprintln!("wrote {} and {}", lat.display(), rps.display());
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("plot: {e}");
        std::process::exit(1);
    }
}
