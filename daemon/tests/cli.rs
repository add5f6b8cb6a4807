//! The command line: configuration errors are clear messages with a non-zero exit, never a
//! panic; --help tells the truth; SIGTERM stops the daemon in order.

mod common;

use common::*;
use machnet::testing::process::output_within;
use std::process::{Command, Output};

/// machnetd with `args`, expected to exit by itself (an error, --help): bounded, so a
/// configuration that is wrongly accepted fails the test instead of serving forever.
fn machnetd(args: &[&str]) -> Output {
    output_within(Command::new(env!("CARGO_BIN_EXE_machnetd")).args(args), RUN, &format!("machnetd {args:?}"))
}

fn with_config(text: &str) -> Output {
    let dir = TempDir::new("cli");
    let path = dir.0.join("config.json");
    std::fs::write(&path, text).unwrap();
    let sock = dir.0.join("s.sock");
    machnetd(&["--config", path.to_str().unwrap(), "--ctrl-sock", sock.to_str().unwrap()])
}

#[track_caller]
fn fails_with(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn configuration_errors_are_reported_clearly() {
    fails_with(&machnetd(&["--config", "/nonexistent/machnet.json"]), 2, &["/nonexistent/machnet.json", "cannot read"]);
    fails_with(&with_config("{ not json"), 2, &["configuration error", "invalid configuration", "line 1"]);
    fails_with(
        &with_config(r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1", "colour": "blue"}}}"#),
        2,
        &["unknown field `colour`"],
    );
    fails_with(
        &with_config(r#"{"machnet_config": {"not-a-mac": {"ip": "198.18.0.1"}}}"#),
        2,
        &["machnet_config.not-a-mac", "bad MAC"],
    );
    fails_with(
        &with_config(r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.300"}}}"#),
        2,
        &["machnet_config.02:00:00:00:00:01.ip", "not an IPv4 address"],
    );
    fails_with(
        &with_config(
            r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1"}}, "machnet_rs": {"udp": {"bind": "127.0.0.1:1"}, "idle": "lazy"}}"#,
        ),
        2,
        &["machnet_rs.idle", "\"lazy\""],
    );
}

#[test]
fn runtime_errors_exit_non_zero_without_panic() {
    // A UDP port already taken.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = with_config(&format!(
        r#"{{"machnet_config": {{"02:00:00:00:00:01": {{"ip": "198.18.0.1"}}}}, "machnet_rs": {{"udp": {{"bind": "127.0.0.1:{port}"}}}}}}"#
    ));
    fails_with(&out, 1, &["udp backend", "cannot bind"]);
    // The DPDK backend: without the `dpdk` feature it is not in the binary; with it, a device
    // DPDK has no driver for fails EAL initialisation. Either way: a clear error, exit 1.
    let out = with_config(
        r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1", "pcie": "net_nosuchdriver0"}}, "machnet_rs": {"backend": "dpdk"}}"#,
    );
    if cfg!(feature = "dpdk") {
        fails_with(&out, 1, &["DPDK EAL initialisation failed"]);
    } else {
        fails_with(&out, 1, &["dpdk backend is not built into this machnetd", "--features dpdk"]);
    }
}

#[test]
fn help_lists_the_real_flags() {
    let out = machnetd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--config", "--ctrl-sock", "--log-level", "--metrics-addr", "config_json", "MACHNET_CTRL_SOCK", "SIGTERM"]
    {
        assert!(help.contains(flag), "--help lacks {flag}: {help}");
    }
    let out = machnetd(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = machnetd(&["--metrics-addr", "localhost"]);
    fails_with(&out, 2, &["--metrics-addr", "not an ip:port"]);
}

#[test]
fn sigterm_stops_in_order_and_removes_the_socket() {
    let (mut a, b) = Daemon::pair("");
    // An application with a connected flow is told when the daemon goes.
    let mb = b.app();
    let mut l = mb.attach().unwrap();
    l.listen(IP_B, 888).unwrap();
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, 888).unwrap();
    ch.send(flow, b"before shutdown").unwrap();
    let mut buf = [0u8; 64];
    assert!(l.recv_blocking(&mut buf, Some(std::time::Duration::from_secs(5))).unwrap().is_some());
    let sock = a.sock.clone();
    let st = a.stop();
    assert!(st.success(), "exit status {st:?}");
    assert!(!sock.exists(), "control socket removed");
    let log = a.log_text();
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
    // The peer saw the flow reset.
    let t = std::time::Instant::now();
    loop {
        if let Some(ev) = l.poll_event() {
            assert_eq!(ev.kind, machnet::ops::EventKind::FlowClosed);
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "peer not told");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The local application was told too.
    assert!(ch.poll_event().is_some() || ch.is_closed(), "local app not told");
}
