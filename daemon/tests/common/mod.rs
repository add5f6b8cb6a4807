//! Process-level test support: real `machnetd` processes on the UDP backend over loopback.
#![allow(dead_code)]

pub mod load;

use machnet::client::{Channel, Machnet};
use machnet::layout::MachnetFlow;
use std::io::Read;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Two free UDP ports on loopback.
pub fn free_ports() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

pub const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// A running daemon, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub ip: Ipv4Addr,
    _dir: TempDir,
}

impl Daemon {
    /// Starts `machnetd` for `ip`/`mac` tunnelling on `bind_port` to `peer_port`, with extra
    /// `machnet_rs` keys (a JSON fragment starting with a comma, or empty).
    pub fn start(tag: &str, ip: Ipv4Addr, mac: &str, bind_port: u16, peer_port: u16, extra: &str) -> Daemon {
        let ext = format!(
            r#""udp": {{"bind": "127.0.0.1:{bind_port}", "peers": ["127.0.0.1:{peer_port}"]}}, "idle": "adaptive" {extra}"#
        );
        let d = Daemon::spawn(tag, ip, mac, 1, &ext, None);
        d.wait_ready();
        d
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
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_machnetd")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_machnetd")),
        };
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .arg("--ctrl-sock")
            .arg(&sock)
            .arg("--log-level")
            .arg(std::env::var("MACHNETD_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn machnetd");
        Daemon { child: Some(child), sock, log, ip, _dir: dir }
    }

    /// Waits until the daemon serves its control socket.
    pub fn wait_ready(&self) {
        let t = Instant::now();
        while !self.sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "machnetd did not start: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A started pair A (198.18.0.1) and B (198.18.0.2) tunnelling to each other.
    pub fn pair(extra: &str) -> (Daemon, Daemon) {
        let (pa, pb) = free_ports();
        let a = Daemon::start("a", IP_A, "02:00:00:00:00:01", pa, pb, extra);
        let b = Daemon::start("b", IP_B, "02:00:00:00:00:02", pb, pa, extra);
        (a, b)
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

    /// SIGTERM, wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("machnetd did not stop on SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon (SIGTERM), checks it exited 0, and returns its log.
    pub fn stop_log(mut self) -> String {
        let st = self.stop();
        let log = self.log_text();
        assert!(st.success(), "machnetd {} exited with {st}:\n{log}", self.ip);
        log
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

/// libmachnet.so built from the current sources (`cargo test` builds the crate only as an
/// rlib), in a target directory of its own shared with the channel crate's C tests.
pub fn lib_dir() -> PathBuf {
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

pub fn build_hello(dir: &Path, lib: &Path) -> PathBuf {
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

/// The C hello_world client on daemon `a` says hello to a Rust server on daemon `b` (port
/// 31580, the example's default) and gets the reply.
pub fn c_client_to_rust_server(exe: &Path, lib: &Path, a: &Daemon, b: &Daemon) {
    let mb = b.app();
    let mut srv = mb.attach().unwrap();
    srv.listen(b.ip, 31580).unwrap();
    let server = std::thread::spawn(move || {
        let _m = mb;
        let mut buf = [0u8; 64];
        let (n, f) = srv.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap().expect("a message");
        assert_eq!(&buf[..n], b"Hello World!");
        srv.send(reverse(f), &buf[..n]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let out = Command::new(exe)
        .args(["--local", &a.ip.to_string(), "--remote", &b.ip.to_string()])
        .env("MACHNET_CTRL_SOCK", &a.sock)
        .env("LD_LIBRARY_PATH", lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("Listening on {}:31580", a.ip)), "{stdout}");
    assert!(stdout.contains("Reply: Hello World!"), "{stdout}");
    server.join().unwrap();
}
