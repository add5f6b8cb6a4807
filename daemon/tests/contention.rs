//! The contention harness: two daemons and their applications, each pair pinned to one CPU,
//! with CPU-burning processes at the same priority on every CPU (a shared VM, a CI runner).
//! A slow machine may make the stack slow, never wrong:
//!
//! * no flow fails, and every message arrives once, in order, with its content intact
//!   (mixed sizes from 1 B to 1 MiB, windows 1 to 8, both directions);
//! * channels keep being attached, connected, used and detached meanwhile;
//! * the daemons stay responsive: `machnetctl` answers, and SIGTERM stops them within 1 s.
//!
//! The traffic is `common::traffic` (the DPDK variants are in `dpdk.rs`).
//! `MACHNET_CONTENTION_SECS` sets the traffic time (default 10 s); the figures are printed.

mod common;

use common::load::Hogs;
use common::traffic::*;
use common::*;
use machnet::client::Channel;
use machnet::layout::MachnetFlow;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[test]
fn udp_pair_under_cpu_hogs_loses_nothing_and_stays_responsive() {
    let (mut a, mut b) = Daemon::pair_pinned("");
    let hogs = Hogs::start(2);
    eprintln!("{} CPU hogs on {} CPUs; traffic for {} s", hogs.count(), common::load::cpus(), secs());
    let t = run_traffic(&a, &b, secs(), (0, 1));
    // Asked to stop under load, with flows open and messages queued, each daemon exits
    // within a second.
    let m = a.app();
    let mut chans: Vec<(Channel, MachnetFlow)> = (0..2)
        .map(|_| {
            let mut ch = m.attach().unwrap();
            let f = ch.connect(IP_A, IP_B, PORT).unwrap_or_else(|e| panic!("connect before shutdown: {e}"));
            (ch, f)
        })
        .collect();
    for (ch, f) in &mut chans {
        let len = size_of(f.src_port, 0);
        let mut msg = vec![0u8; len];
        fill_msg(&mut msg, f.src_port, 0);
        send_retry(ch, *f, &msg);
    }
    t.stop_servers.store(true, Ordering::Relaxed);
    let took_b = b.stop_within(Duration::from_secs(1));
    let took_a = a.stop_within(Duration::from_secs(1));
    eprintln!("SIGTERM to exit under load: A {took_a:?}, B {took_b:?}");
    for h in t.servers {
        join_within(h, Duration::from_secs(10), "an echo server");
    }
    drop(hogs);
}

/// Closing a channel must not stop its shard: unmapping a used channel's tens of megabytes takes
/// 10-20 ms, which the controller does, not the shard. Judged by the shard thread's CPU time in
/// each channel adoption and removal, so that a loaded machine's preemptions do not count.
#[test]
fn closing_used_channels_does_not_stall_the_shard() {
    const PORT_ECHO: u16 = 890;
    let (a, b) = Daemon::pair("");
    let server = echo_server_on(&b, PORT_ECHO, u64::MAX);
    let m = a.app();
    for round in 0..10 {
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(IP_A, IP_B, PORT_ECHO).unwrap();
        // Touch a few thousand pages of the channel: 64 messages of 64 KiB out, and back.
        ping_pong(&mut ch, flow, round, 65_536, 64, 8);
        ch.detach().unwrap();
    }
    drop(m);
    for d in [&a, &b] {
        let s = d.ctl_within("shards", Duration::from_secs(5));
        let sh = &s["shards"][0];
        let op = sh["counters"]["max_channel_op_cpu_us"].as_f64().unwrap();
        eprintln!("{}: the longest channel adoption or removal took {op:.0} us of the shard's CPU", d.ip);
        assert!(op < 1000.0, "{}: a channel operation held the shard for {op:.0} us", d.ip);
    }
    drop(server);
}

/// A daemon serving many used channels stops within a second of SIGTERM (it resets the flows,
/// tells the applications and exits; unmapping every channel one by one would take seconds).
#[test]
fn sigterm_with_many_used_channels_stops_within_a_second() {
    const PORT_ECHO: u16 = 891;
    let (mut a, b) = Daemon::pair("");
    let server = echo_server_on(&b, PORT_ECHO, u64::MAX);
    let m = a.app();
    let mut chans = Vec::new();
    for round in 0..48 {
        let mut ch = m.attach().unwrap();
        let flow = ch.connect(IP_A, IP_B, PORT_ECHO).unwrap();
        ping_pong(&mut ch, flow, round, 65_536, 32, 8);
        chans.push(ch);
    }
    let took = a.stop_within(Duration::from_secs(1));
    eprintln!("48 used channels: stopped {took:?} after SIGTERM");
    drop((chans, m, server));
}
