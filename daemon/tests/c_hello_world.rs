//! The C hello_world (channel/examples/hello_world.c), built against machnet.h and
//! libmachnet.so, talks through real daemons to a Rust peer, in both roles.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn channel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("channel")
}

/// libmachnet.so built from the current sources (`cargo test` builds the crate only as an
/// rlib), in a target directory of its own shared with the channel crate's C tests.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap().join("capi-lib");
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--lib", "--manifest-path"])
        .arg(channel_dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "building libmachnet failed:\n{}", String::from_utf8_lossy(&out.stderr));
    target.join("debug")
}

fn build_hello(dir: &Path, lib: &Path) -> PathBuf {
    let exe = dir.join("hello_world_c");
    let out = Command::new("cc")
        .arg("-std=c99")
        .arg("-D_DEFAULT_SOURCE")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&exe)
        .arg(channel_dir().join("examples/hello_world.c"))
        .arg(format!("-I{}", channel_dir().join("include").display()))
        .arg(format!("-L{}", lib.display()))
        .arg("-lmachnet")
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn c_hello_world_both_roles() {
    let lib = lib_dir();
    let tmp = TempDir::new("hello-c");
    let exe = build_hello(&tmp.0, &lib);
    let (a, b) = Daemon::pair("");

    // C client on A, Rust server on B.
    let mb = b.app();
    let mut srv = mb.attach().unwrap();
    srv.listen(IP_B, 31580).unwrap();
    let server = std::thread::spawn(move || {
        let _m = mb;
        let mut buf = [0u8; 64];
        let (n, f) = srv.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("a message");
        assert_eq!(&buf[..n], b"Hello World!");
        srv.send(reverse(f), &buf[..n]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let out = Command::new(&exe)
        .args(["--local", "198.18.0.1", "--remote", "198.18.0.2"])
        .env("MACHNET_CTRL_SOCK", &a.sock)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Listening on 198.18.0.1:31580"), "{stdout}");
    assert!(stdout.contains("Reply: Hello World!"), "{stdout}");
    server.join().unwrap();

    // C server on A, Rust client on B.
    let mut child = Command::new(&exe)
        .args(["--local", "198.18.0.1"])
        .env("MACHNET_CTRL_SOCK", &a.sock)
        .env("LD_LIBRARY_PATH", &lib)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mb = b.app();
    let mut cli = mb.attach().unwrap();
    let flow = cli.connect(IP_B, IP_A, 31580).unwrap();
    cli.send(flow, b"Hello World!").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = cli.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("reply from the C server");
    assert_eq!(&buf[..n], b"Hello World!");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Received message: Hello World!, count = 1"), "{stdout}");
}
