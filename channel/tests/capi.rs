//! The C library: `machnet.h` compiles as C99 and C++, and a C program (built here with the
//! `cc` crate, linked against `libmachnet.a` and `libmachnet.so`) exercises every function in
//! its own process against the test engine in this one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use machnet::layout::ChannelConfig;
use machnet::testing::process::{libmachnet_dir, output_within};
use machnet::testing::{unique_path, TestEngine, TestEngineConfig};

/// A temp file removed when dropped, also when the test fails.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn channel_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compiler(cpp: bool) -> Command {
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut b = cc::Build::new();
    b.cargo_metadata(false).cargo_warnings(false).target(&target).host(&target).opt_level(2).cpp(cpp);
    b.get_compiler().to_command()
}

/// A compiler run: seconds, but bounded all the same.
const COMPILE_LIMIT: Duration = Duration::from_secs(300);

#[track_caller]
fn run_ok(mut c: Command) {
    let out = output_within(&mut c, COMPILE_LIMIT, "the C compiler");
    assert!(
        out.status.success(),
        "{c:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_c99_and_cpp() {
    let inc = channel_dir().join("include");
    let src = Temp(unique_path("hdr.c"));
    let src = &src.0;
    std::fs::write(src, "#include \"machnet.h\"\nint main(void) { return (int)sizeof(MachnetMsgHdr_t) - 40; }\n")
        .unwrap();
    let mut c = compiler(false);
    c.args(["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"]).arg(&inc).arg(src);
    run_ok(c);
    let srcpp = Temp(unique_path("hdr.cpp"));
    let srcpp = &srcpp.0;
    std::fs::write(
        srcpp,
        "#include \"machnet.h\"\nstatic_assert(sizeof(MachnetMsgHdr_t) == 40, \"layout\");\n\
         static_assert(sizeof(MachnetFlow_t) == 12, \"layout\");\n\
         int (*volatile init_fn)(void) = machnet_init;\n\
         ssize_t (*volatile recv_fn)(const void *, void *, size_t, MachnetFlow_t *) = machnet_recv;\n\
         int main() { MachnetFlow_t f = {1, 2, 3, 4}; return f.src_ip == 1 ? 0 : 1; }\n",
    )
    .unwrap();
    let mut c = compiler(true);
    c.args(["-std=c++11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"]).arg(&inc).arg(srcpp);
    run_ok(c);
}

/// Builds the C test program; `static_link` picks libmachnet.a over libmachnet.so.
fn build_program(static_link: bool) -> Temp {
    let exe = Temp(unique_path(if static_link { "machnet_test_static" } else { "machnet_test_shared" }));
    let dir = libmachnet_dir();
    let mut c = compiler(false);
    c.args(["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(channel_dir().join("include"))
        .arg(channel_dir().join("tests/c/machnet_test.c"))
        .arg("-o")
        .arg(&exe.0);
    if static_link {
        c.arg(dir.join("libmachnet.a")).args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
    } else {
        c.arg("-L").arg(&dir).arg("-lmachnet").arg(format!("-Wl,-rpath,{}", dir.display())).arg("-lm");
    }
    run_ok(c);
    exe
}

/// Runs `exe args` against `eng`, with a time limit; returns stdout.
fn run_program(exe: &Path, args: &[&str], eng: &TestEngine, limit: Duration) -> String {
    let out = output_within(
        Command::new(exe)
            .args(args)
            .env("MACHNET_CTRL_SOCK", eng.socket_path())
            // cargo's LD_LIBRARY_PATH for tests may hold an older libmachnet.so; use the fresh one.
            .env("LD_LIBRARY_PATH", libmachnet_dir()),
        limit,
        &format!("{exe:?} {args:?}"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{exe:?} {args:?} failed\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn c_program_exercises_every_function_static_and_shared() {
    for static_link in [true, false] {
        let exe = build_program(static_link);
        let eng = TestEngine::start(TestEngineConfig::default()).unwrap();
        let out = run_program(&exe.0, &["api"], &eng, Duration::from_secs(120));
        assert!(out.contains("PASS api"), "{out}");
        // Both channels were detached and reclaimed whole.
        assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 2 && e.live_channels() == 0));
        let recs = eng.reclaimed();
        assert!(recs.iter().all(|r| r.after.violations_total() == 0));
        // Exactly one message was refused: the one sent on the closed flow.
        assert_eq!(recs.iter().map(|r| r.after.refused).sum::<u64>(), 1);
    }
}

#[test]
fn c_client_round_trips_2p20_messages_and_64_large_ones_across_processes() {
    let exe = build_program(true);
    let eng = TestEngine::start(TestEngineConfig::default()).unwrap();
    let t = Instant::now();
    let out = run_program(&exe.0, &["roundtrip", "1048576", "64"], &eng, Duration::from_secs(900));
    println!("{out}in {:.1} s", t.elapsed().as_secs_f64());
    assert!(out.contains("PASS roundtrip 1048640 messages"), "{out}");
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 1));
    let r = eng.reclaimed()[0];
    assert_eq!((r.after.tx_msgs, r.after.violations_total()), ((1 << 20) + 64, 0));
}

#[test]
fn c_full_ring_and_too_small_receives_leak_nothing() {
    let exe = build_program(true);
    let cfg = TestEngineConfig {
        channel: ChannelConfig { mss: 1418, tx_bufs: 64, rx_bufs: 64, tx_ring: 16, rx_ring: 16, ctrl_ring: 16 },
        ..Default::default()
    };
    let eng = TestEngine::start(cfg).unwrap();
    let out = run_program(&exe.0, &["limits"], &eng, Duration::from_secs(120));
    assert!(out.contains("PASS limits"), "{out}");
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 1));
    let r = eng.reclaimed()[0];
    assert_eq!(r.after.violations_total(), 0);
}
