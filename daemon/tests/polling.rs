//! Applications that spin on `machnet_recv` (as the original's msg_gen and hello_world do)
//! sharing their CPUs with the daemons: the library gives the CPU away when a poll finds
//! nothing (`MACHNET_POLL`, default adaptive), so round trips take microseconds, not the
//! scheduler's ticks (4 ms here), although every CPU holds a spinning application and a shard.

mod common;

use common::*;
use machnet::testing::process::{libmachnet_dir, output_within, ChildGuard, Lines};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROUNDS: u32 = 2000;

#[test]
fn a_c_application_spinning_on_recv_gets_microsecond_round_trips() {
    let (a, b) = Daemon::pair_pinned("");
    let lib = libmachnet_dir();
    let tmp = TempDir::new("spin-c");
    let exe = tmp.0.join("spin_pingpong");
    let out = output_within(
        Command::new("cc")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&exe)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/spin_pingpong.c"))
            .arg(format!("-I{}", channel_dir().join("include").display()))
            .arg(format!("-L{}", lib.display()))
            .arg("-lmachnet"),
        RUN,
        "cc",
    );
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    // Each application on its daemon's CPU, as in the demo: two spinners per CPU.
    let mut server = ChildGuard::spawn(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(&exe)
            .args(["--server", "198.18.0.2"])
            .env("MACHNET_CTRL_SOCK", &b.sock)
            .env("LD_LIBRARY_PATH", &lib)
            .stdout(Stdio::piped()),
        "spinning C server",
    );
    let mut lines = Lines::new(server.child().stdout.take().unwrap());
    lines.expect(&mut server, Duration::from_secs(20), "listening", |l| l == "listening");
    let out = output_within(
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(&exe)
            .args(["--client", "198.18.0.1", "198.18.0.2", &ROUNDS.to_string()])
            .env("MACHNET_CTRL_SOCK", &a.sock)
            .env("LD_LIBRARY_PATH", &lib),
        Duration::from_secs(60),
        "spinning C client",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", text.trim());
    let field = |k: &str| -> f64 {
        text.split_whitespace().skip_while(|w| *w != k).nth(1).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    assert_eq!(field("trips") as u32, ROUNDS, "every round trip completed: {text}");
    // Ticks would make the median milliseconds; a yielding poller makes it tens of µs.
    let p50 = field("p50");
    assert!(p50 < 1000.0, "median round trip {p50} us: spinning applications wait for the scheduler's tick");
}
