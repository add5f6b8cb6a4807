//! The C library: `machnet.h` and `machnet_common.h` compile as C99 and C++ with the original's
//! constants and the libc headers the original's header brings, and a C program (built here
//! with the `cc` crate, linked against `libmachnet.a` and `libmachnet.so`) exercises every
//! function in its own process against the test engine in this one.

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
    // The command without the compiler's environment (the cc crate sets it all).
    let args: Vec<_> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    assert!(
        out.status.success(),
        "{} {}\n{}{}",
        c.get_program().to_string_lossy(),
        args.join(" "),
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

/// Compiles `src` (C99 or C++11, `-pedantic -Wall -Wextra -Werror`) against `include/` and
/// fails with the compiler's output.
#[track_caller]
fn compiles(name: &str, cpp: bool, std: &str, src: &str) {
    let file = Temp(unique_path(name));
    std::fs::write(&file.0, src).unwrap();
    let mut c = compiler(cpp);
    c.arg(format!("-std={std}"))
        .args(["-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
        .arg(channel_dir().join("include"))
        .arg(&file.0);
    run_ok(c);
}

/// The original's public constants with their values, checked at compile time (C99 has no
/// static_assert: a negative array size is the error). Shared by the C and C++ checks.
const COMMON_CHECKS: &str = "\
#define CHECK(name, cond) typedef char check_##name[(cond) ? 1 : -1]
CHECK(flow, sizeof(MachnetFlow_t) == 12 && sizeof(struct MachnetFlow) == 12);
CHECK(flow_ofs, offsetof(MachnetFlow_t, src_port) == 8 && offsetof(MachnetFlow_t, dst_port) == 10);
CHECK(listener, sizeof(MachnetListenerInfo_t) == 8 && offsetof(MachnetListenerInfo_t, port) == 4);
CHECK(max_len, MACHNET_MSG_MAX_LEN == 8 * 1024 * 1024);
CHECK(kb_mb, KB == 1024 && MB == 1024 * 1024);
CHECK(sizes, CACHE_LINE_SIZE == 64 && PAGE_SIZE == 4096 && HUGE_PAGE_2M_SIZE == 2 * 1024 * 1024);
CHECK(flags, MACHNET_MSGBUF_FLAGS_SYN == 0x01 && MACHNET_MSGBUF_FLAGS_SG == 0x02 &&
             MACHNET_MSGBUF_FLAGS_FIN == 0x04 && MACHNET_MSGBUF_FLAGS_CHAIN == 0x08 &&
             MACHNET_MSGBUF_NOTIFY_DELIVERY == 0x80);
CHECK(magic, MACHNET_CHANNEL_CTX_MAGIC == 0xA5A5A5A5u && MACHNET_MSGBUF_MAGIC == 0xB6B6B6B6u &&
             MACHNET_CHANNEL_VERSION == 1);
CHECK(ctrl, MACHNET_CTRL_STATUS_OK == 0 && MACHNET_CTRL_STATUS_ERROR == 1 &&
            MACHNET_CTRL_OP_CREATE_FLOW == 1 && MACHNET_CTRL_OP_DESTROY_FLOW == 2 &&
            MACHNET_CTRL_OP_LISTEN == 3 && MACHNET_CTRL_OP_STATUS == 4);
";

#[test]
fn common_header_compiles_alone_with_the_originals_constants() {
    for (cpp, std, name) in [(false, "c99", "common.c"), (true, "c++11", "common.cpp")] {
        // machnet_common.h on its own, and twice (include guard).
        let src = format!(
            "#include \"machnet_common.h\"\n#include \"machnet_common.h\"\n{COMMON_CHECKS}\
             int main(void) {{ MachnetChannelCtx_t *ctx = NULL; MachnetListenerInfo_t l = {{1, 2, 0}};\n\
               struct stat st; memset(&st, 0, sizeof st);\n\
               assert(ctx == NULL); return (int)l.reserved + (O_RDWR & 0) + (PROT_READ & 0); }}\n"
        );
        compiles(name, cpp, std, &src);
        // The same checks through machnet.h.
        let src = format!("#include \"machnet.h\"\n{COMMON_CHECKS}int main(void) {{ return 0; }}\n");
        compiles(name, cpp, std, &src);
    }
}

#[test]
fn application_may_define_the_size_macros_itself() {
    // Defined before (the same tokens as ours or different ones): no redefinition warning, and
    // MACHNET_MSG_MAX_LEN does not depend on the application's MB.
    let src = "#define KB 1000\n#define MB (KB * 1000)\n#define CACHE_LINE_SIZE 128\n\
               #define PAGE_SIZE 65536\n#define HUGE_PAGE_2M_SIZE (2 << 20)\n#include \"machnet.h\"\n\
               typedef char max_len_is_8_mib[MACHNET_MSG_MAX_LEN == 8 * 1024 * 1024 ? 1 : -1];\n\
               typedef char app_kb_wins[KB == 1000 ? 1 : -1];\n\
               int main(void) { return 0; }\n";
    compiles("app_macros.c", false, "c99", src);
    compiles("app_macros.cpp", true, "c++11", src);
}

#[test]
fn machnet_h_brings_stdio_stdlib_unistd_like_the_original() {
    // An application in the style of the original's examples includes only machnet.h and calls
    // printf, exit, usleep, strlen, malloc (usleep needs the default feature set, not -std=c99:
    // gnu11 as `cc` uses by default; g++ always has it).
    let body = "#include \"machnet.h\"\n\
                int main(int argc, char **argv) {\n\
                  (void)argv; char *p = (char *)malloc(16); if (p == NULL) exit(1);\n\
                  if (argc > 5) { usleep(10); printf(\"%zu\\n\", strlen(p)); }\n\
                  free(p); return 0;\n\
                }\n";
    compiles("app_libc.c", false, "gnu11", body);
    compiles("app_libc.cpp", true, "c++11", body);
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
