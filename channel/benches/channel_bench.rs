//! Channel benchmark: one-way throughput and round trip between an application thread and an
//! engine thread over one channel (two mappings of the same memfd, as across processes),
//! 64 B and 1 KiB messages, in ns per message; next to baselines measured in the same run.
//!
//! `cargo bench -p machnet-channel --bench channel_bench` (or run the built binary). Prints a
//! Markdown table. Nothing here asserts a time.
//!
//! * one-way: the app sends N messages as fast as the channel takes them; the engine thread
//!   takes each (`poll_tx`), copies its payload out (`read_seg`), acknowledges it (`free_tx`)
//!   and flushes returns every 32 messages. Time from the first send until the engine has
//!   consumed all N, divided by N.
//! * round trip: the app sends one message and busy-polls for the reply; the engine copies it
//!   into an RX buffer and delivers it back.
//! * baselines: the same producer/consumer threads moving one `u64` per message through a raw
//!   ring of this crate (no buffers, no validation) and through `std::sync::mpsc::sync_channel`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use machnet::client::{Channel, Error};
use machnet::engine::EngineChannel;
use machnet::layout::{ChannelConfig, MachnetFlow, RING_HDR_LEN};
use machnet::ring::{Consumer, Producer};

const FLOW: MachnetFlow = MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 };
const RUNS: usize = 7;

/// One benchmark row: a run returning ns per message.
type Row = Box<dyn Fn() -> f64>;

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn ncpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// ns per message of one run of `f`, over `runs` runs: (median, min, max).
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn one_way(size: usize, n: u64) -> f64 {
    let (mut e, fds) = EngineChannel::create(&ChannelConfig::DEFAULT, "bench", false).unwrap();
    let mut app = Channel::from_fds(fds).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    let engine = std::thread::spawn(move || {
        pin(1);
        let mut scratch = vec![0u8; e.mss()];
        let mut got = 0u64;
        let mut since_flush = 0;
        while got < n {
            match e.poll_tx() {
                Some(m) => {
                    let m = m.unwrap();
                    let len = e.read_seg(m.head, &mut scratch);
                    std::hint::black_box(&scratch[..len]);
                    e.free_tx(m.head);
                    got += 1;
                    since_flush += 1;
                    if since_flush == 32 {
                        e.flush();
                        since_flush = 0;
                    }
                }
                None => {
                    e.flush();
                    since_flush = 0;
                    std::hint::spin_loop();
                }
            }
        }
        e.flush();
        d2.store(got, Ordering::Release);
        e
    });
    pin(0);
    let msg = vec![0xABu8; size];
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        match app.send(FLOW, &msg) {
            Ok(()) => sent += 1,
            Err(Error::RingFull | Error::NoBuffers) => std::hint::spin_loop(),
            Err(e) => panic!("{e}"),
        }
    }
    while done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    drop(engine.join().unwrap());
    ns
}

fn round_trip(size: usize, n: u64) -> f64 {
    let (mut e, fds) = EngineChannel::create(&ChannelConfig::DEFAULT, "bench", false).unwrap();
    let mut app = Channel::from_fds(fds).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let engine = std::thread::spawn(move || {
        pin(1);
        let mut scratch = vec![0u8; e.mss()];
        while !s2.load(Ordering::Relaxed) {
            if let Some(m) = e.poll_tx() {
                let m = m.unwrap();
                let len = e.read_seg(m.head, &mut scratch);
                let rx = e.alloc_rx(&scratch[..len]).unwrap();
                e.free_tx(m.head);
                e.deliver(m.flow.reversed(), rx, 1, m.len).unwrap();
                e.flush();
            } else {
                std::hint::spin_loop();
            }
        }
        e
    });
    pin(0);
    let msg = vec![0xABu8; size];
    let mut buf = vec![0u8; size];
    let t = Instant::now();
    for _ in 0..n {
        app.send(FLOW, &msg).unwrap();
        while app.recv(&mut buf).unwrap().is_none() {
            std::hint::spin_loop();
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    stop.store(true, Ordering::Relaxed);
    drop(engine.join().unwrap());
    ns
}

/// Baseline: one u64 per message through a raw ring of this crate (4096 entries).
fn raw_ring(n: u64) -> f64 {
    let entries = 4096u32;
    let layout = std::alloc::Layout::from_size_align(RING_HDR_LEN + entries as usize * 8, 64).unwrap();
    // SAFETY: non-zero size; freed below after both threads are done.
    let mem = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
    // SAFETY: the memory holds a ring header and `entries` u32-pair slots (we move u32 pairs as
    // two u32 slots would be slower; a [u32; 2] is not Slot, so send u32 indices as the channel
    // rings do) and outlives both handles.
    let (mut p, mut c) = unsafe { (Producer::<u32>::new(mem, entries), Consumer::<u32>::new(mem, entries)) };
    let consumer = std::thread::spawn(move || {
        pin(1);
        let mut got = 0u64;
        let mut sum = 0u64;
        let mut batch = [0u32; 32];
        while got < n {
            let k = c.read_batch(&mut batch).unwrap();
            for v in &batch[..k] {
                sum = sum.wrapping_add(*v as u64);
            }
            c.release();
            got += k as u64;
            if k == 0 {
                std::hint::spin_loop();
            }
        }
        std::hint::black_box(sum);
    });
    pin(0);
    let t = Instant::now();
    let mut i = 0u64;
    while i < n {
        if p.write(i as u32).unwrap() {
            i += 1;
            if i % 32 == 0 {
                p.publish();
            }
        } else {
            p.publish();
            std::hint::spin_loop();
        }
    }
    p.publish();
    consumer.join().unwrap();
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    // SAFETY: allocated above with this layout; both handles are gone.
    unsafe { std::alloc::dealloc(mem.as_ptr(), layout) };
    ns
}

/// Baseline: one u64 per message through std's bounded channel.
fn std_mpsc(n: u64) -> f64 {
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(4096);
    let consumer = std::thread::spawn(move || {
        pin(1);
        let mut sum = 0u64;
        for v in rx.iter().take(n as usize) {
            sum = sum.wrapping_add(v);
        }
        std::hint::black_box(sum);
    });
    pin(0);
    let t = Instant::now();
    for i in 0..n {
        tx.send(i).unwrap();
    }
    consumer.join().unwrap();
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a.starts_with("--test")) {
        return; // `cargo test --benches` probes bench binaries; nothing to list.
    }
    let quick = std::env::var_os("MACHNET_BENCH_QUICK").is_some();
    let scale = if quick { 20 } else { 1 };
    let membarrier = machnet::shm::membarrier_register();
    println!(
        "# channel_bench: {RUNS} interleaved runs per row, {} CPUs (app thread on CPU 0, engine on CPU 1); \
         doorbell handshake: {}\n",
        ncpus(),
        if membarrier { "membarrier (release-store publish)" } else { "SeqCst-store publish (MACHNET_NO_MEMBARRIER)" }
    );
    let rows: Vec<(&str, Row)> = vec![
        ("baseline: raw SPSC ring, one u32 per message", Box::new(move || raw_ring(20_000_000 / scale))),
        ("baseline: std::sync::mpsc::sync_channel(4096), one u64", Box::new(move || std_mpsc(5_000_000 / scale))),
        ("channel one-way, 64 B", Box::new(move || one_way(64, 10_000_000 / scale))),
        ("channel one-way, 1 KiB", Box::new(move || one_way(1024, 2_000_000 / scale))),
        ("channel round trip, 64 B", Box::new(move || round_trip(64, 200_000 / scale))),
        ("channel round trip, 1 KiB", Box::new(move || round_trip(1024, 200_000 / scale))),
    ];
    // Interleave: run every row once per round, so all rows see the same machine state (this
    // VM has fast and slow periods).
    let mut results = vec![Vec::new(); rows.len()];
    for _ in 0..RUNS {
        for (i, (_, f)) in rows.iter().enumerate() {
            results[i].push(f());
        }
    }
    let mpsc = stats(results[1].clone()).0;
    println!("| operation | median ns/msg | min | max | × mpsc baseline |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, _), r) in rows.iter().zip(results) {
        let (med, min, max) = stats(r);
        println!("| {name} | {med:.1} | {min:.1} | {max:.1} | {:.2} |", med / mpsc);
    }
}
