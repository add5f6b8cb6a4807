//! msg_gen as a user runs it: the original's flags and output lines, `--msg_nr`, `--json`,
//! `--verify`, SIGINT, bad flags; here in embedded mode over the udp tunnel (no daemon, no
//! DPDK), and kernel_rpc, which shares the loop.

use machnet::testing::process::{output_within, port_taken, with_free_udp_ports, ChildGuard, Lines};
use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every run of a test program is bounded by this; a failure says which program hung.
const LIMIT: Duration = Duration::from_secs(60);
/// Clients give up when no response arrives for this long (instead of waiting forever).
const NO_RESPONSE: &str = "20";

/// An embedded msg_gen server on 198.18.0.2, serving once it printed its listening line, and
/// the ports: (server's, client's). The embedded stacks need each other's port before either
/// starts, so a port can be taken in between: the server then exits saying so, and it starts
/// again on other ports.
fn server(size: usize) -> (ChildGuard, u16, u16) {
    with_free_udp_ports("msg_gen server", |me, peer| {
        let mut g = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_msg_gen"))
                .args(["--embedded", &format!("udp:127.0.0.1:{me},127.0.0.1:{peer}"), "--local_ip", "198.18.0.2"])
                .args(["--msg_size", &size.to_string(), "--timeout", "60"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            "msg_gen server",
        );
        let mut err = Lines::new(g.child().stderr.take().unwrap());
        if err.wait_for(Duration::from_secs(20), |l| l.contains("listening on")).is_some() {
            return Ok((g, me, peer));
        }
        match g.wait_timeout(Duration::from_secs(1)) {
            Some(_) if port_taken(&err.seen()) => Err(err.seen()),
            Some(st) => panic!("msg_gen server exited ({st}) before listening: {}", err.seen()),
            None => panic!("msg_gen server printed no listening line in 20 s: {}", err.seen()),
        }
    })
}

fn client(me: u16, peer: u16, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msg_gen"));
    c.args(["--embedded", &format!("udp:127.0.0.1:{me},127.0.0.1:{peer}"), "--local_ip", "198.18.0.1"])
        .args(["--remote_ip", "198.18.0.2", "--timeout", NO_RESPONSE])
        .args(extra);
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn totals(stdout: &str) -> Vec<u64> {
    // Application Statistics (TOTAL) - [TX] Sent: <n> (<b> Bytes), Drops: <d>, [RX] Received: <m> (<b> Bytes)
    let line = stdout.lines().find(|l| l.starts_with("Application Statistics (TOTAL) - [TX] Sent: ")).expect("totals");
    line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

#[test]
fn msg_nr_verify_json_and_the_original_output_lines() {
    let (_srv, ps, pc) = server(1000);
    // --msg_nr is honoured exactly; every response is checked.
    let out = output_within(
        &mut client(pc, ps, &["--msg_size", "1000", "--msg_window", "8", "--msg_nr", "3000", "--verify"]),
        LIMIT,
        "msg_gen client (--msg_nr 3000)",
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = totals(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(t, vec![3000, 3_000_000, 0, 3000, 3_000_000], "{}", text(&out));
}

#[test]
fn per_second_lines_json_and_sigint() {
    let (_srv, ps, pc) = server(64);
    let out = output_within(
        &mut client(pc, ps, &["--msg_size", "64", "--msg_window", "4", "--duration", "2.3"]),
        LIMIT,
        "msg_gen client (--duration 2.3)",
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("TX/RX (msg/sec, Gbps): (")).collect();
    assert_eq!(lines.len(), 2, "one line per second: {stdout}");
    for l in &lines {
        // TX/RX (msg/sec, Gbps): (<tx>K/<rx>K, <txG>/<rxG>). RTT (p50/99/99.9 us): <p50>/<p99>/<p999>
        let (rate, rtt) = l.split_once("). RTT (p50/99/99.9 us): ").expect(l);
        assert!(rate.contains("K/") && rate.contains("K, "), "{l}");
        let p: Vec<u64> = rtt.split('/').map(|x| x.trim().parse().expect(l)).collect();
        assert!(p.len() == 3 && p[0] <= p[1] && p[1] <= p[2], "{l}");
    }
    // --json: the per-second lines go to stderr and stdout ends with one JSON object.
    let (_srv2, ps2, pc2) = server(100);
    let out = output_within(
        &mut client(pc2, ps2, &["--msg_size", "100", "--msg_nr", "500", "--json"]),
        LIMIT,
        "msg_gen client (--json)",
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["rx_msgs"], 500);
    assert_eq!(json["rtt_samples"], 500);
    assert!(json["rtt_p50_us"].as_f64().unwrap() > 0.0);
    // SIGINT: a clean exit with the totals.
    let (_srv3, ps3, pc3) = server(64);
    let child = ChildGuard::spawn(
        client(pc3, ps3, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()),
        "msg_gen client (SIGINT)",
    );
    std::thread::sleep(Duration::from_millis(800));
    child.signal(libc::SIGINT);
    let t = Instant::now();
    let out = child.output_within(LIMIT);
    assert!(t.elapsed() < Duration::from_secs(5), "SIGINT took {:?}", t.elapsed());
    assert!(out.status.success());
    let t = totals(&String::from_utf8_lossy(&out.stdout));
    assert!(t[3] > 0, "responses before the interrupt");
}

#[test]
fn the_embedded_server_leaves_when_its_client_is_done() {
    let (srv, ps, pc) = server(64);
    let out = output_within(&mut client(pc, ps, &["--msg_nr", "100"]), LIMIT, "msg_gen client (--msg_nr 100)");
    assert!(out.status.success(), "{}", text(&out));
    // The server exits by itself once its client is gone.
    let out = srv.output_within(Duration::from_secs(10));
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(totals(&s)[3], 100, "{s}");
}

#[test]
fn bad_flags_are_refused_clearly() {
    let run = |args: &[&str]| output_within(Command::new(env!("CARGO_BIN_EXE_msg_gen")).args(args), LIMIT, "msg_gen");
    let out = run(&["--local_ip", "198.18.0.1", "--msg_size", "8"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--msg_size must be greater than 8"));
    let out = run(&["--local_ip", "198.18.0.1", "--remote_ip", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("is not an IPv4 address"));
    let out = run(&["--local_ip", "198.18.0.1", "--embedded", "udp:nonsense"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("expected udp:BIND,PEER"), "{}", text(&out));
    let out = run(&["--help"]);
    for flag in [
        "--local_ip",
        "--remote_ip",
        "--remote_port",
        "--local_port",
        "--msg_size",
        "--msg_window",
        "--msg_nr",
        "--verify",
        "--duration",
        "--json",
        "--embedded",
    ] {
        assert!(text(&out).contains(flag), "--help lacks {flag}");
    }
}

/// A kernel_rpc server serving once it printed its listening line, and its address. It binds
/// a port of its own choice and says which: no port changes hands.
fn kernel_server(proto: &str, size: &str, extra: &[&str]) -> (ChildGuard, String) {
    let mut srv = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_kernel_rpc"))
            .args(["--proto", proto, "--listen", "127.0.0.1:0", "--msg_size", size, "--timeout", "60"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        &format!("kernel_rpc {proto} server"),
    );
    let mut err = Lines::new(srv.child().stderr.take().unwrap());
    let line = err.expect(&mut srv, Duration::from_secs(20), "a listening line", |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (srv, addr)
}

#[test]
fn kernel_baselines_run_the_same_loop() {
    for proto in ["udp", "tcp"] {
        let (_srv, addr) = kernel_server(proto, "200", &[]);
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_kernel_rpc"))
                .args(["--proto", proto, "--connect", &addr, "--msg_size", "200", "--timeout", NO_RESPONSE])
                .args(["--msg_window", "4", "--msg_nr", "1000", "--verify", "--json"]),
            LIMIT,
            "kernel_rpc client",
        );
        assert!(out.status.success(), "{proto}: {}", text(&out));
        let json: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(json["rx_msgs"], 1000, "{proto}");
    }
}

/// A window of large messages over TCP holds far more than the socket buffers (8 x 4 MiB
/// against a few MB): both ends keep what the socket does not take and write it while they
/// read, so neither blocks writing while the other does the same (the baseline used to
/// deadlock there, and S6 had to leave its 8 MiB x 8 row out). Blocking and busy-polling.
#[test]
fn kernel_tcp_with_a_window_beyond_the_socket_buffers_keeps_moving() {
    const SIZE: &str = "4194304";
    for busy in [false, true] {
        let poll: &[&str] = if busy { &["--busy_poll"] } else { &[] };
        let (_srv, addr) = kernel_server("tcp", SIZE, poll);
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_kernel_rpc"))
                .args(["--proto", "tcp", "--connect", &addr, "--msg_size", SIZE, "--timeout", NO_RESPONSE])
                .args(["--msg_window", "8", "--msg_nr", "40", "--verify", "--json"])
                .args(poll),
            LIMIT,
            "kernel_rpc client, 4 MiB messages, window 8",
        );
        assert!(out.status.success(), "busy_poll {busy}: {}", text(&out));
        let json: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(json["rx_msgs"], 40, "busy_poll {busy}");
    }
}

#[test]
fn a_client_whose_server_never_answers_gives_up_with_timeout() {
    // Nobody listens: the request goes nowhere and no answer can come.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = port.local_addr().unwrap().to_string();
    let t = Instant::now();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_kernel_rpc")).args(["--proto", "udp", "--connect", &addr, "--timeout", "0.5"]),
        LIMIT,
        "kernel_rpc client without a server",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no response for 0.5 s (--timeout): 0 of 8 requests answered"), "{}", text(&out));
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(port);
}
