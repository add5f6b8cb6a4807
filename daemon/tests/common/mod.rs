//! Process-level test support: real `machnetd` processes on the UDP backend over loopback.
#![allow(dead_code)]

pub mod load;
pub mod traffic;

use machnet::client::{Channel, Machnet};
use machnet::layout::MachnetFlow;
use machnet::testing::process::{output_within, port_taken, with_free_udp_ports, ChildGuard};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "machnetd-test-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const MAC_A: &str = "02:00:00:00:00:01";
pub const MAC_B: &str = "02:00:00:00:00:02";

/// How long a daemon may take to serve its control socket.
pub(crate) const READY: Duration = Duration::from_secs(20);
/// How long it may take to stop on SIGTERM.
const STOP: Duration = Duration::from_secs(10);
/// Every run of a short-lived program (machnetd refusing a configuration, machnetctl, a C
/// client) is bounded by this.
pub const RUN: Duration = Duration::from_secs(60);

/// Why [`Daemon::until`] gave up.
pub(crate) enum Gone {
    Exited(ExitStatus),
    TimedOut,
}

/// A running daemon, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Option<ChildGuard>,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub ip: Ipv4Addr,
    _dir: TempDir,
}

impl Daemon {
    /// Starts `machnetd` for `ip`/`mac` tunnelling on `bind_port` to `peer_port`, with extra
    /// `machnet_rs` keys (a JSON fragment starting with a comma, or empty), and waits until it
    /// serves. `Err` if it exited because its UDP port was taken (for
    /// [`with_free_udp_ports`]); any other failure fails the test.
    pub fn try_start(
        tag: &str,
        ip: Ipv4Addr,
        mac: &str,
        bind_port: u16,
        peer_port: u16,
        extra: &str,
    ) -> Result<Daemon, String> {
        Daemon::try_start_peers(tag, ip, mac, bind_port, &[peer_port], extra)
    }

    /// [`try_start`](Self::try_start) with several UDP peers (loopback ports).
    pub fn try_start_peers(
        tag: &str,
        ip: Ipv4Addr,
        mac: &str,
        bind_port: u16,
        peer_ports: &[u16],
        extra: &str,
    ) -> Result<Daemon, String> {
        let peers: Vec<String> = peer_ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let ext = format!(
            r#""udp": {{"bind": "127.0.0.1:{bind_port}", "peers": [{}]}}, "idle": "adaptive" {extra}"#,
            peers.join(", ")
        );
        let mut d = Daemon::spawn(tag, ip, mac, 1, &ext, None);
        match d.until(READY, |d| d.sock.exists()) {
            Ok(()) => Ok(d),
            Err(Gone::Exited(_)) if port_taken(&d.log_text()) => {
                Err(format!("machnetd {ip} could not bind 127.0.0.1:{bind_port}: {}", d.log_text().trim()))
            }
            Err(why) => d.failed(why, "its control socket"),
        }
    }

    /// Spawns `machnetd` for `ip`/`mac` with `engine_threads` shards and the body of its
    /// `machnet_rs` object (`ext`), inside network namespace `netns` if given. Call
    /// [`wait_ready`](Self::wait_ready) before using it.
    pub fn spawn(tag: &str, ip: Ipv4Addr, mac: &str, engine_threads: u32, ext: &str, netns: Option<&str>) -> Daemon {
        let dir = TempDir::new(tag);
        let cfg = dir.0.join("config.json");
        let sock = dir.0.join("ctrl.sock");
        let log = dir.0.join("machnetd.log");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"machnet_config": {{"{mac}": {{"ip": "{ip}", "engine_threads": {engine_threads}}}}},
                   "machnet_rs": {{{ext}}}}}"#
            ),
        )
        .unwrap();
        // `ip netns exec` executes machnetd in its own place: the pid is the daemon's.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_machnetd")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_machnetd")),
        };
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--ctrl-sock")
            .arg(&sock)
            .arg("--log-level")
            .arg(std::env::var("MACHNETD_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = ChildGuard::spawn(&mut cmd, &format!("machnetd {ip}"));
        Daemon { child: Some(child), sock, log, ip, _dir: dir }
    }

    /// Polls `cond` until it holds; gives up at once when the daemon exits, or after `limit`.
    fn until(&mut self, limit: Duration, cond: impl Fn(&Daemon) -> bool) -> Result<(), Gone> {
        let t = Instant::now();
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_status()) {
                return Err(Gone::Exited(st));
            }
            if t.elapsed() >= limit {
                return Err(Gone::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[track_caller]
    fn failed(&self, why: Gone, what: &str) -> ! {
        match why {
            Gone::Exited(st) => {
                panic!("machnetd {} exited ({st}) while the test waited for {what}:\n{}", self.ip, self.log_text())
            }
            Gone::TimedOut => panic!("machnetd {}: waited {READY:?} in vain for {what}:\n{}", self.ip, self.log_text()),
        }
    }

    /// Waits (20 s at most) until `cond` holds; fails the test, saying it waited for `what`,
    /// as soon as the daemon exits or at the deadline.
    #[track_caller]
    pub fn wait_until(&mut self, what: &str, cond: impl Fn(&Daemon) -> bool) {
        if let Err(why) = self.until(READY, cond) {
            self.failed(why, what);
        }
    }

    /// Waits until the daemon serves its control socket (see [`wait_until`](Self::wait_until)).
    #[track_caller]
    pub fn wait_ready(&mut self) {
        self.wait_until("its control socket", |d| d.sock.exists());
    }

    /// A started pair A (198.18.0.1) and B (198.18.0.2) tunnelling to each other.
    pub fn pair(extra: &str) -> (Daemon, Daemon) {
        Daemon::pair_with(extra, extra)
    }

    /// A started pair with different extra keys for A and B. The two need each other's port
    /// before either starts, so if either finds its port taken both start again on new ones.
    pub fn pair_with(extra_a: &str, extra_b: &str) -> (Daemon, Daemon) {
        with_free_udp_ports("a machnetd pair", |pa, pb| {
            let a = Daemon::try_start("a", IP_A, MAC_A, pa, pb, extra_a)?;
            let b = Daemon::try_start("b", IP_B, MAC_B, pb, pa, extra_b)?;
            Ok((a, b))
        })
    }

    /// Starts `machnetd` for `ip`/`mac` with `shards` shards, its tunnel queues on `bind`..
    /// `bind + shards - 1` and RSS key `key` (hex), its peer's queues at `peer.0` with `peer.1`
    /// queues and key `peer.2` (see [`try_start`](Self::try_start) for `extra` and `Err`).
    pub fn try_start_shards(
        tag: &str,
        (ip, mac): (Ipv4Addr, &str),
        (shards, bind, key): (u32, u16, &str),
        peer: (u16, u32, &str),
        extra: &str,
    ) -> Result<Daemon, String> {
        let ext = format!(
            r#""udp": {{"bind": "127.0.0.1:{bind}", "rss_key": "{key}",
                       "peers": [{{"addr": "127.0.0.1:{}", "queues": {}, "rss_key": "{}"}}]}},
               "idle": "adaptive" {extra}"#,
            peer.0, peer.1, peer.2
        );
        let mut d = Daemon::spawn(tag, ip, mac, shards, &ext, None);
        match d.until(READY, |d| d.sock.exists()) {
            Ok(()) => Ok(d),
            Err(Gone::Exited(_)) if port_taken(&d.log_text()) => {
                Err(format!("machnetd {ip} could not bind 127.0.0.1:{bind}+: {}", d.log_text().trim()))
            }
            Err(why) => d.failed(why, "its control socket"),
        }
    }

    /// A started pair A (198.18.0.1, `shards_a` shards, RSS key `keys.0`) and B (198.18.0.2,
    /// `shards_b`, `keys.1`) tunnelling to each other over loopback, each told the other's
    /// queues and key; with `extra` keys for both.
    pub fn pair_shards(shards_a: u32, shards_b: u32, keys: (&str, &str), extra: &str) -> (Daemon, Daemon) {
        with_free_udp_ports("a multi-queue machnetd pair", |pa, pb| {
            let (ra, rb) = (u32::from(pa)..u32::from(pa) + shards_a, u32::from(pb)..u32::from(pb) + shards_b);
            if ra.end > 65536 || rb.end > 65536 || (ra.start < rb.end && rb.start < ra.end) {
                return Err(format!("queue ports {ra:?} and {rb:?} do not fit apart"));
            }
            let a =
                Daemon::try_start_shards("a", (IP_A, MAC_A), (shards_a, pa, keys.0), (pb, shards_b, keys.1), extra)?;
            let b =
                Daemon::try_start_shards("b", (IP_B, MAC_B), (shards_b, pb, keys.1), (pa, shards_a, keys.0), extra)?;
            Ok((a, b))
        })
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn app(&self) -> Machnet {
        Machnet::connect(&self.sock).expect("register with machnetd")
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Sends SIGTERM (see [`wait_exit`](Self::wait_exit)).
    pub fn terminate(&self) {
        self.child.as_ref().expect("running").signal(libc::SIGTERM);
    }

    /// Waits at most `limit` for the daemon to exit; kills it and fails otherwise.
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        match child.wait_timeout(limit) {
            Some(st) => st,
            None => {
                child.kill();
                panic!("machnetd {} did not stop within {limit:?} of SIGTERM:\n{}", self.ip, self.log_text());
            }
        }
    }

    /// SIGTERM, wait; returns the exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        self.terminate();
        self.wait_exit(STOP)
    }

    /// Stops the daemon (SIGTERM), checks it exited 0, and returns its log.
    #[track_caller]
    pub fn stop_log(mut self) -> String {
        let st = self.stop();
        let log = self.log_text();
        assert!(st.success(), "machnetd {} exited with {st}:\n{log}", self.ip);
        log
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    pub fn sock_path(&self) -> &Path {
        &self.sock
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // MACHNETD_KEEP_LOGS=<dir>: keep every daemon's whole log there (for debugging).
        if let Some(dir) = std::env::var_os("MACHNETD_KEEP_LOGS") {
            let name =
                format!("machnetd-{}-{}-{}.log", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed), self.ip);
            let _ = std::fs::copy(&self.log, Path::new(&dir).join(name));
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- machnetd {} log (last {} lines) ----", self.ip, tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        // SIGTERM, 5 s to exit in order, then the guard's SIGKILL.
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGTERM);
            c.wait_timeout(Duration::from_secs(5));
        }
    }
}

/// `machnetctl --ctrl-sock sock args…`, not yet run.
pub fn machnetctl_command(sock: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_machnetctl"));
    c.arg("--ctrl-sock").arg(sock).args(args);
    c
}

/// Runs `machnetctl` (within [`RUN`]).
pub fn machnetctl(sock: &Path, args: &[&str]) -> std::process::Output {
    output_within(&mut machnetctl_command(sock, args), RUN, &format!("machnetctl {args:?}"))
}

/// `machnetctl --json what`, parsed; fails the test if it fails.
pub fn ctl_json(sock: &Path, what: &str) -> serde_json::Value {
    let out = machnetctl(sock, &["--json", what]);
    assert!(out.status.success(), "machnetctl {what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The reverse of a received flow (to reply).
pub fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

/// Byte `j` of message `k` of stream `s`.
pub fn pattern(s: u64, k: u64, j: usize) -> u8 {
    let x = s.wrapping_mul(0x9e37_79b9).wrapping_add(k.wrapping_mul(131)).wrapping_add(j as u64 * 7);
    (x ^ (x >> 11)) as u8
}

pub fn fill(buf: &mut [u8], s: u64, k: u64) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = pattern(s, k, j);
    }
}

pub fn check(buf: &[u8], s: u64, k: u64) {
    for (j, b) in buf.iter().enumerate() {
        if *b != pattern(s, k, j) {
            panic!("message {k} of stream {s}: byte {j} is {b:#x}, expected {:#x}", pattern(s, k, j));
        }
    }
}

/// Sends, retrying while the local rings or pools are full.
pub fn send_retry(ch: &mut Channel, flow: MachnetFlow, data: &[u8]) {
    let t = Instant::now();
    loop {
        match ch.send(flow, data) {
            Ok(()) => return,
            Err(machnet::client::Error::RingFull) | Err(machnet::client::Error::NoBuffers) => {
                assert!(t.elapsed() < Duration::from_secs(60), "send blocked for a minute");
                std::thread::yield_now();
            }
            Err(e) => panic!("send failed: {e}"),
        }
    }
}

/// An echo server on daemon `d`: listens on `port`; every message goes back on the reversed
/// flow, until `count` messages (or 30 s of silence, or its daemon going away). Returns how
/// many it echoed.
pub fn echo_server_on(d: &Daemon, port: u16, count: u64) -> std::thread::JoinHandle<u64> {
    let m = d.app();
    let mut ch = m.attach().unwrap();
    ch.listen(d.ip, port).unwrap();
    std::thread::spawn(move || {
        let _m = m;
        let mut buf = vec![0u8; 9 << 20];
        let mut n = 0;
        while n < count {
            match ch.recv_blocking(&mut buf, Some(Duration::from_secs(30))) {
                Ok(Some((len, flow))) => {
                    send_retry(&mut ch, reverse(flow), &buf[..len]);
                    n += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        n
    })
}

/// Sends `n` messages of `size` on `flow` with `window` outstanding, verifying each echo.
pub fn ping_pong(ch: &mut Channel, flow: MachnetFlow, stream: u64, size: usize, n: u64, window: u64) {
    let mut out = vec![0u8; size];
    let mut inb = vec![0u8; size.max(1) + 1];
    let (mut sent, mut got) = (0u64, 0u64);
    while got < n {
        while sent < n && sent - got < window {
            fill(&mut out, stream, sent);
            send_retry(ch, flow, &out);
            sent += 1;
        }
        match ch.recv_blocking(&mut inb, Some(Duration::from_secs(30))).unwrap() {
            Some((len, from)) => {
                assert_eq!(len, size, "echo length");
                assert_eq!(reverse(from), flow, "echo arrives on the flow it was sent on");
                check(&inb[..len], stream, got);
                got += 1;
            }
            None => panic!("no echo for 30 s ({got}/{n} of {size} B)"),
        }
    }
}

pub fn channel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("channel")
}

/// Builds the C hello_world example against libmachnet in `lib`.
pub fn build_hello(dir: &Path, lib: &Path) -> PathBuf {
    let exe = dir.join("hello_world_c");
    let out = output_within(
        Command::new("cc")
            .arg("-std=c99")
            .arg("-D_DEFAULT_SOURCE")
            .arg("-Wall")
            .arg("-Werror")
            .arg("-o")
            .arg(&exe)
            .arg(channel_dir().join("examples/hello_world.c"))
            .arg(format!("-I{}", channel_dir().join("include").display()))
            .arg(format!("-L{}", lib.display()))
            .arg("-lmachnet"),
        Duration::from_secs(300),
        "cc (hello_world.c)",
    );
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// The C hello_world client on daemon `a` says hello to a Rust server on daemon `b` (port
/// 31580, the example's default) and gets the reply.
pub fn c_client_to_rust_server(exe: &Path, lib: &Path, a: &Daemon, b: &Daemon) {
    let mb = b.app();
    let mut srv = mb.attach().unwrap();
    srv.listen(b.ip, 31580).unwrap();
    // Bounded by its receive timeout (and the sleep), so joining it is too.
    let server = std::thread::spawn(move || {
        let _m = mb;
        let mut buf = [0u8; 64];
        let (n, f) = srv.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("a message");
        assert_eq!(&buf[..n], b"Hello World!");
        srv.send(reverse(f), &buf[..n]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let out = output_within(
        Command::new(exe)
            .args(["--local", &a.ip.to_string(), "--remote", &b.ip.to_string()])
            .env("MACHNET_CTRL_SOCK", &a.sock)
            .env("LD_LIBRARY_PATH", lib),
        RUN,
        "the C hello_world client",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("Listening on {}:31580", a.ip)), "{stdout}");
    assert!(stdout.contains("Reply: Hello World!"), "{stdout}");
    server.join().unwrap();
}
