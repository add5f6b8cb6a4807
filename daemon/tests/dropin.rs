//! Drop-in: applications written for the original Machnet build unchanged against machnet-rs
//! with the original's own commands and talk through real daemons (udp backend over loopback).
//!
//! * `channel/tests/dropin/hello_world.cc` (C++, gflags) and `hello_world.c` (C) include only
//!   `<machnet.h>` and rely on it for `printf`, `exit`, `usleep`, ...; they are built with
//!   `g++ -o hello hello.cc -I<inc> -L<lib> -lmachnet_shim -lrt -lgflags` and
//!   `cc -o hello hello.c -I<inc> -L<lib> -lmachnet_shim -lrt`, without a single warning.
//! * `channel/tests/dropin/rust` is a cargo project whose bindings bindgen generates from
//!   `machnet.h` in its build.rs, as the original's Rust binding is made, linking `machnet_shim`.
//!
//! Each program records `libmachnet_shim.so` as DT_NEEDED (the library has no SONAME), which
//! the lib dir provides as a symlink to `libmachnet.so`. Every wait is bounded, and every child
//! process is killed when the test ends, also when it fails.

mod common;

use common::*;
use machnet::testing::process::{output_within, ChildGuard, Lines};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a server gets to start listening, and a client to finish.
const START: Duration = Duration::from_secs(20);
const FINISH: Duration = Duration::from_secs(30);

fn include_dir() -> PathBuf {
    channel_dir().join("include")
}

fn sources() -> PathBuf {
    channel_dir().join("tests/dropin")
}

/// libmachnet built from the current sources ([`libmachnet_dir`](machnet::testing::process::libmachnet_dir)) plus the original's names for it,
/// `libmachnet_shim.so` and `libmachnet_shim.a` (symlinks, created atomically: tests of this
/// and other test binaries may look at the directory at the same time).
fn shim_lib_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = machnet::testing::process::libmachnet_dir();
        for (link, target) in [("libmachnet_shim.so", "libmachnet.so"), ("libmachnet_shim.a", "libmachnet.a")] {
            assert!(dir.join(target).exists(), "{} was not built", dir.join(target).display());
            if std::fs::read_link(dir.join(link)).is_ok_and(|t| t == Path::new(target)) {
                continue;
            }
            let tmp = dir.join(format!(".{link}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp).unwrap();
            std::fs::rename(&tmp, dir.join(link)).unwrap();
        }
        dir
    })
    .clone()
}

/// A Machnet application under test: killed (and reaped) when dropped, its stdout and stderr
/// read on threads so that the test can wait for a line with a time limit.
struct App {
    child: ChildGuard,
    out: Lines,
    err: Lines,
}

impl App {
    /// A Machnet application `exe args` registering with daemon `d`.
    fn machnet(name: &str, exe: &Path, args: &[&str], d: &Daemon) -> App {
        let mut cmd = Command::new(exe);
        // cargo's LD_LIBRARY_PATH for tests may hold an older libmachnet.so: only the fresh one.
        cmd.args(args)
            .env("MACHNET_CTRL_SOCK", &d.sock)
            .env("LD_LIBRARY_PATH", shim_lib_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd, name);
        let out = Lines::new(child.child().stdout.take().unwrap());
        let err = Lines::new(child.child().stderr.take().unwrap());
        App { child, out, err }
    }

    fn describe(&self) -> String {
        format!("---- stdout ----\n{}---- stderr ----\n{}", self.out.seen(), self.err.seen())
    }

    /// Waits until the program has printed a line containing `needle`.
    #[track_caller]
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        self.out.expect(&mut self.child, limit, &format!("{needle:?}"), |l| l.contains(needle));
    }

    /// Waits for a successful exit and returns everything the program printed.
    #[track_caller]
    fn finish(&mut self, limit: Duration) -> String {
        let st = self.child.wait_within(limit);
        // The pipes close with the process (it starts no children).
        self.out.wait_closed(Duration::from_secs(5));
        self.err.wait_closed(Duration::from_secs(5));
        assert!(st.success(), "exited with {st}\n{}", self.describe());
        self.out.seen()
    }
}

/// Runs a build command to completion within `limit` and returns its output; panics with
/// the command's output if it fails or takes too long.
fn run_bounded(what: &str, mut cmd: Command, limit: Duration) -> Output {
    let out = output_within(cmd.stdin(Stdio::null()), limit, what);
    assert!(
        out.status.success(),
        "{what} failed ({}): {cmd:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds one of the C/C++ sources with the original's command line; the compiler must not
/// print anything (a missing declaration in machnet.h would show as an implicit-declaration
/// warning in C).
fn build_original_style(dir: &Path, src: &str, cpp: bool) -> PathBuf {
    let exe = dir.join(src.replace('.', "_"));
    let mut cmd = Command::new(if cpp { "g++" } else { "cc" });
    cmd.arg("-o")
        .arg(&exe)
        .arg(sources().join(src))
        .arg(format!("-I{}", include_dir().display()))
        .arg(format!("-L{}", shim_lib_dir().display()))
        .arg("-lmachnet_shim")
        .arg("-lrt");
    if cpp {
        cmd.arg("-lgflags");
    }
    let out = run_bounded(&format!("compiling {src}"), cmd, Duration::from_secs(120));
    let diag = String::from_utf8_lossy(&out.stderr);
    assert!(diag.trim().is_empty(), "compiling {src} printed diagnostics:\n{diag}");
    check_needs_shim(&exe);
    exe
}

/// The program records `libmachnet_shim.so` as needed, and the lib dir it runs with has it.
fn check_needs_shim(exe: &Path) {
    let mut cmd = Command::new("readelf");
    cmd.arg("-d").arg(exe);
    let out = run_bounded("readelf -d", cmd, Duration::from_secs(30));
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(needed.contains(&"libmachnet_shim.so"), "{} needs {needed:?}, not libmachnet_shim.so", exe.display());
    let shim = shim_lib_dir().join("libmachnet_shim.so");
    assert_eq!(
        std::fs::canonicalize(&shim).unwrap(),
        std::fs::canonicalize(shim_lib_dir().join("libmachnet.so")).unwrap(),
        "{} is not libmachnet.so",
        shim.display()
    );
}

/// The bindgen project built with a nested cargo into `<target>/dropin-rust` (its own
/// workspace and lock file; bindgen needs libclang, found as cargo's build scripts find it).
fn bindgen_app() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let target = exe.parent().unwrap().parent().unwrap().parent().unwrap().join("dropin-rust");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--locked", "--manifest-path"])
            .arg(sources().join("rust/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .env_remove("CARGO_TARGET_DIR")
            .env("MACHNET_INCLUDE_DIR", include_dir())
            .env("MACHNET_LIB_DIR", shim_lib_dir());
        run_bounded("cargo build of channel/tests/dropin/rust", cmd, Duration::from_secs(900));
        let exe = target.join("debug/hello_bindgen");
        check_needs_shim(&exe);
        exe
    })
    .clone()
}

#[test]
fn cpp_client_gets_an_answer_from_c_server() {
    let tmp = TempDir::new("dropin-cpp-c");
    let cpp = build_original_style(&tmp.0, "hello_world.cc", true);
    let c = build_original_style(&tmp.0, "hello_world.c", false);
    let (a, b) = Daemon::pair("");

    let mut server = App::machnet("C server", &c, &["--local", "198.18.0.1", "--count", "1"], &a);
    server.wait_for("Listening on 198.18.0.1:31580", START);
    server.wait_for("Waiting for message from client", START);
    // gflags syntax of the original's usage line: --flag=value.
    let mut client = App::machnet("C++ client", &cpp, &["--local=198.18.0.2", "--remote=198.18.0.1"], &b);
    let out = client.finish(FINISH);
    assert!(out.contains("Listening on 198.18.0.2:31580"), "{}", client.describe());
    assert!(out.contains("Sending message to 198.18.0.1:31580"), "{}", client.describe());
    assert!(out.contains("Reply: Hello World!"), "{}", client.describe());
    let out = server.finish(FINISH);
    assert!(out.contains("Received message: Hello World!, count = 1"), "{}", server.describe());
}

#[test]
fn c_client_gets_an_answer_from_cpp_server() {
    let tmp = TempDir::new("dropin-c-cpp");
    let cpp = build_original_style(&tmp.0, "hello_world.cc", true);
    let c = build_original_style(&tmp.0, "hello_world.c", false);
    let (a, b) = Daemon::pair("");

    let mut server = App::machnet("C++ server", &cpp, &["--local=198.18.0.2", "--count=1"], &b);
    server.wait_for("Listening on 198.18.0.2:31580", START);
    server.wait_for("Waiting for message from client", START);
    let mut client = App::machnet("C client", &c, &["--local", "198.18.0.1", "--remote", "198.18.0.2"], &a);
    let out = client.finish(FINISH);
    assert!(out.contains("Reply: Hello World!"), "{}", client.describe());
    let out = server.finish(FINISH);
    assert!(out.contains("Received message: Hello World!, count = 1"), "{}", server.describe());
}

#[test]
fn bindgen_rust_client_gets_an_answer_from_c_server() {
    let tmp = TempDir::new("dropin-bindgen-c");
    let c = build_original_style(&tmp.0, "hello_world.c", false);
    let rust = bindgen_app();
    let (a, b) = Daemon::pair("");

    let mut server = App::machnet("C server", &c, &["--local", "198.18.0.1", "--count", "1"], &a);
    server.wait_for("Waiting for message from client", START);
    let mut client = App::machnet("bindgen client", &rust, &["--local", "198.18.0.2", "--remote", "198.18.0.1"], &b);
    let out = client.finish(FINISH);
    assert!(out.contains("Listening on 198.18.0.2:31580"), "{}", client.describe());
    assert!(out.contains("Reply: Hello from bindgen!"), "{}", client.describe());
    let out = server.finish(FINISH);
    assert!(out.contains("Received message: Hello from bindgen!, count = 1"), "{}", server.describe());
}

#[test]
fn rust_client_gets_answers_from_bindgen_rust_server() {
    let rust = bindgen_app();
    let (a, b) = Daemon::pair("");

    let mut server = App::machnet("bindgen server", &rust, &["--local", "198.18.0.1", "--count", "2"], &a);
    server.wait_for("Waiting for message from client", START);
    let mb = b.app();
    let mut cli = mb.attach().unwrap();
    let flow = cli.connect(IP_B, IP_A, 31580).unwrap();
    let mut buf = [0u8; 64];
    for msg in [&b"first"[..], b"second"] {
        cli.send(flow, msg).unwrap();
        let got = cli.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap();
        let (n, from) = got.unwrap_or_else(|| panic!("no answer to {msg:?} in 10 s\n{}", server.describe()));
        assert_eq!(&buf[..n], msg, "answer");
        assert_eq!(reverse(from), flow, "the answer comes back on the flow");
    }
    let out = server.finish(FINISH);
    assert!(out.contains("Received message: first, count = 1"), "{}", server.describe());
    assert!(out.contains("Received message: second, count = 2"), "{}", server.describe());
}
