//! msg_gen as a user runs it: the original's flags and output lines, `--msg_nr`, `--json`,
//! `--verify`, SIGINT, bad flags; here in embedded mode over the udp tunnel (no daemon, no
//! DPDK), and kernel_rpc, which shares the loop.

use std::net::UdpSocket;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_ports() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An embedded msg_gen server on 198.18.0.2 tunnelling UDP from `me` to `peer`.
fn server(me: u16, peer: u16, size: usize) -> Kill {
    Kill(
        Command::new(env!("CARGO_BIN_EXE_msg_gen"))
            .args(["--embedded", &format!("udp:127.0.0.1:{me},127.0.0.1:{peer}"), "--local_ip", "198.18.0.2"])
            .args(["--msg_size", &size.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn client(me: u16, peer: u16, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msg_gen"));
    c.args(["--embedded", &format!("udp:127.0.0.1:{me},127.0.0.1:{peer}"), "--local_ip", "198.18.0.1"])
        .args(["--remote_ip", "198.18.0.2"])
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
    let (ps, pc) = free_ports();
    let _srv = server(ps, pc, 1000);
    std::thread::sleep(Duration::from_millis(300));
    // --msg_nr is honoured exactly; every response is checked.
    let out =
        client(pc, ps, &["--msg_size", "1000", "--msg_window", "8", "--msg_nr", "3000", "--verify"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = totals(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(t, vec![3000, 3_000_000, 0, 3000, 3_000_000], "{}", text(&out));
}

#[test]
fn per_second_lines_json_and_sigint() {
    let (ps, pc) = free_ports();
    let _srv = server(ps, pc, 64);
    std::thread::sleep(Duration::from_millis(300));
    let out = client(pc, ps, &["--msg_size", "64", "--msg_window", "4", "--duration", "2.3"]).output().unwrap();
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
    let (ps2, pc2) = free_ports();
    let _srv2 = server(ps2, pc2, 100);
    std::thread::sleep(Duration::from_millis(300));
    let out = client(pc2, ps2, &["--msg_size", "100", "--msg_nr", "500", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["rx_msgs"], 500);
    assert_eq!(json["rtt_samples"], 500);
    assert!(json["rtt_p50_us"].as_f64().unwrap() > 0.0);
    // SIGINT: a clean exit with the totals.
    let (ps3, pc3) = free_ports();
    let _srv3 = server(ps3, pc3, 64);
    std::thread::sleep(Duration::from_millis(300));
    let child = client(pc3, ps3, &[]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(out.status.success());
    let t = totals(&String::from_utf8_lossy(&out.stdout));
    assert!(t[3] > 0, "responses before the interrupt");
}

#[test]
fn the_embedded_server_leaves_when_its_client_is_done() {
    let (ps, pc) = free_ports();
    let mut srv = server(ps, pc, 64);
    std::thread::sleep(Duration::from_millis(300));
    let out = client(pc, ps, &["--msg_nr", "100"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = Instant::now();
    while srv.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = String::new();
    std::io::Read::read_to_string(srv.0.stdout.as_mut().unwrap(), &mut s).unwrap();
    assert_eq!(totals(&s)[3], 100, "{s}");
}

#[test]
fn bad_flags_are_refused_clearly() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_msg_gen")).args(args).output().unwrap();
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

#[test]
fn kernel_baselines_run_the_same_loop() {
    for proto in ["udp", "tcp"] {
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let _s = Kill(
            Command::new(env!("CARGO_BIN_EXE_kernel_rpc"))
                .args(["--proto", proto, "--listen", &format!("127.0.0.1:{port}"), "--msg_size", "200"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(env!("CARGO_BIN_EXE_kernel_rpc"))
            .args(["--proto", proto, "--connect", &format!("127.0.0.1:{port}"), "--msg_size", "200"])
            .args(["--msg_window", "4", "--msg_nr", "1000", "--verify", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{proto}: {}", text(&out));
        let json: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(json["rx_msgs"], 1000, "{proto}");
    }
}
