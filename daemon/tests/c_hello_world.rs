//! The C hello_world (channel/examples/hello_world.c), built against machnet.h and
//! libmachnet.so, talks through real daemons to a Rust peer, in both roles.

mod common;

use common::*;
use machnet::testing::process::{libmachnet_dir, ChildGuard};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn c_hello_world_both_roles() {
    let lib = libmachnet_dir();
    let tmp = TempDir::new("hello-c");
    let exe = build_hello(&tmp.0, &lib);
    let (a, b) = Daemon::pair("");

    // C client on A, Rust server on B.
    c_client_to_rust_server(&exe, &lib, &a, &b);

    // C server on A, Rust client on B.
    let child = ChildGuard::spawn(
        Command::new(&exe)
            .args(["--local", "198.18.0.1"])
            .env("MACHNET_CTRL_SOCK", &a.sock)
            .env("LD_LIBRARY_PATH", &lib)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "the C hello_world server",
    );
    std::thread::sleep(Duration::from_millis(300));
    let mb = b.app();
    let mut cli = mb.attach().unwrap();
    let flow = cli.connect(IP_B, IP_A, 31580).unwrap();
    cli.send(flow, b"Hello World!").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = cli.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("reply from the C server");
    assert_eq!(&buf[..n], b"Hello World!");
    // The server serves forever: kill it, then read what it printed.
    child.signal(libc::SIGKILL);
    let out = child.output_within(RUN);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Received message: Hello World!, count = 1"), "{stdout}");
}
