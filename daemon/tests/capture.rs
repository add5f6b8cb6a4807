//! Packet capture from two real daemons: `machnetctl capture` writes pcapng that `tshark`
//! reads, and the shipped dissector (tools/wireshark/machnet.lua) decodes every Machnet field
//! to what the transport sent.

mod common;

use common::*;
use machnet::testing::process::{output_within, ChildGuard};
use std::process::{Command, Stdio};
use std::time::Duration;

const PORT: u16 = 888;
const SIZE: usize = 1000;
const ROUND_TRIPS: u64 = 20;

fn dissector() -> String {
    format!("{}/../tools/wireshark/machnet.lua", env!("CARGO_MANIFEST_DIR"))
}

/// `tshark` with the dissector on `file`, one line of `fields` (tab-separated) per packet.
fn tshark_fields(file: &std::path::Path, fields: &[&str]) -> Vec<Vec<String>> {
    let mut c = Command::new("tshark");
    c.args(["-n", "-X", &format!("lua_script:{}", dissector()), "-r"]).arg(file).args(["-T", "fields"]);
    for f in fields {
        c.args(["-e", f]);
    }
    let out = output_within(&mut c, RUN, "tshark");
    assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("Lua: Error"), "the dissector failed to load: {err}");
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').map(str::to_string).collect()).collect()
}

#[test]
fn a_capture_from_two_daemons_decodes_in_tshark() {
    if Command::new("tshark").arg("--version").output().is_err() {
        panic!("tshark is not installed: scripts/setup.sh test installs it (apt-get install tshark)");
    }
    let (a, b) = Daemon::pair("");
    let server = echo_server_on(&b, PORT, u64::MAX);
    let m = a.app();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch, flow, 0, SIZE, 2, 1);
    // The capture: one flow, written to standard output, which goes to a file.
    let dir = TempDir::new("capture");
    let file = dir.0.join("flow.pcapng");
    let flow_arg = format!("{}:{}-{}:{}", IP_A, flow.src_port, IP_B, flow.dst_port);
    let expected = 2 * ROUND_TRIPS;
    let mut cap = ChildGuard::spawn(
        machnetctl_command(
            &a.sock,
            &["capture", "-w", "-", "--flow", &flow_arg, "--count", &expected.to_string(), "--duration", "30"],
        )
        .stdout(Stdio::from(std::fs::File::create(&file).unwrap()))
        .stderr(Stdio::piped()),
        "machnetctl capture",
    );
    assert!(a.wait_log("packet capture started", Duration::from_secs(10)), "{}", a.log_text());
    // Traffic of another flow, which the filter leaves out.
    let other = ch.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch, other, 1, 64, 5, 1);
    // Twice the round trips the capture keeps: pure ACKs (a delayed ACK that found no DATA to
    // ride on) take some of its places on a loaded host.
    ping_pong(&mut ch, flow, 2, SIZE, 2 * ROUND_TRIPS, 1);
    let status = cap.wait_timeout(Duration::from_secs(40)).expect("machnetctl capture did not stop after --count");
    let mut err = String::new();
    use std::io::Read;
    cap.child().stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "machnetctl capture failed: {err}");
    assert!(err.contains(&format!("{expected} packets captured")), "{err}");
    assert!(a.wait_log("packet capture stopped", Duration::from_secs(10)), "{}", a.log_text());

    let rows = tshark_fields(
        &file,
        &[
            "frame.interface_name",
            "frame.packet_flags_direction",
            "ip.src",
            "udp.srcport",
            "udp.dstport",
            "machnet.magic",
            "machnet.type",
            "machnet.flags",
            "machnet.seq",
            "machnet.ack",
            "machnet.sack_count",
            "machnet.timestamp",
            "machnet.payload_len",
        ],
    );
    assert_eq!(rows.len() as u64, expected, "{rows:?}");
    let mut requests = Vec::new();
    let mut responses = Vec::new();
    for r in &rows {
        assert_eq!(r.len(), 13, "{r:?}");
        assert_eq!(r[0], "machnet shard 0", "interface named by shard: {r:?}");
        assert_eq!(r[5], "0x4e53", "magic decoded: {r:?}");
        let ports: (u16, u16) = (r[3].parse().unwrap(), r[4].parse().unwrap());
        let ours = ports == (flow.src_port, flow.dst_port) || ports == (flow.dst_port, flow.src_port);
        assert!(ours, "the filter let another flow's frame through: {r:?}");
        if r[6] != "0x00" {
            continue; // a pure ACK
        }
        assert_eq!(r[12], SIZE.to_string(), "payload length: {r:?}");
        assert_eq!(r[7], "0x05", "FIRST|LAST: a one-packet message: {r:?}");
        assert_ne!(r[11], "0", "DATA carries a timestamp: {r:?}");
        let seq: u32 = r[8].parse().unwrap();
        let ack: u32 = r[9].parse().unwrap();
        if r[2] == IP_A.to_string() {
            assert_eq!(r[1], "0x00000002", "A's requests were captured as sent (outbound): {r:?}");
            requests.push((seq, ack));
        } else {
            assert_eq!(r[1], "0x00000001", "B's responses were captured as received (inbound): {r:?}");
            responses.push((seq, ack));
        }
    }
    assert!(requests.len() >= 5 && responses.len() >= 5, "requests {requests:?}, responses {responses:?} in {rows:?}");
    // What the transport sent: consecutive sequence numbers (a retransmission repeats one),
    // and each response acknowledging the request it answers (the cumulative ack rides in
    // B's DATA: piggy-backed).
    for list in [&requests, &responses] {
        for w in list.windows(2) {
            assert!(w[1].0 == w[0].0 + 1 || w[1].0 == w[0].0, "sequence numbers: {list:?}");
        }
    }
    for (seq, ack) in &responses {
        assert!(requests.iter().any(|(q, _)| q + 1 == *ack), "response {seq} acks {ack}: no request {}", ack - 1);
    }
    drop(ch);
    drop(m);
    drop(server);
}

/// A capture's client that goes away (killed) stops the capture in the daemon; a second
/// capture may then start. Bad filters are refused with a clear message.
#[test]
fn a_killed_capture_stops_and_bad_filters_are_refused() {
    let (a, _b) = Daemon::pair("");
    let mut cap = ChildGuard::spawn(
        machnetctl_command(&a.sock, &["capture", "-w", "/dev/null"]).stdout(Stdio::null()).stderr(Stdio::null()),
        "machnetctl capture",
    );
    assert!(a.wait_log("packet capture started", Duration::from_secs(10)), "{}", a.log_text());
    let busy = machnetctl(&a.sock, &["capture", "-w", "/dev/null", "--count", "1"]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("another capture is running"), "{busy:?}");
    cap.kill();
    assert!(a.wait_log("packet capture stopped", Duration::from_secs(10)), "{}", a.log_text());
    let again = machnetctl(&a.sock, &["capture", "-w", "/dev/null", "--duration", "0.2"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let bad = machnetctl(&a.sock, &["capture", "--flow", "198.18.0.1-198.18.0.2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected LOCAL_IP:PORT-REMOTE_IP:PORT"), "{bad:?}");
}
