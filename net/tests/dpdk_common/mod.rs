//! Shared helpers of the DPDK test binaries.
//!
//! DPDK's EAL initialises once per process, and `cargo test` runs a binary's tests as threads
//! of one process, so every DPDK scenario runs in a child process: the parent test re-runs its
//! own test binary with `--exact <child test> --ignored` and `MACHNET_DPDK_CHILD=1`. Child
//! entry points are `#[ignore]`d tests that return at once without that variable. Children talk
//! to the parent with `MN:<word> ...` lines on stdout and read commands from stdin.
#![allow(dead_code)]

use machnet::testing::process::{output_within, self_test, ChildGuard, Lines};
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub const CHILD_ENV: &str = "MACHNET_DPDK_CHILD";

/// True in a child process started by [`ChildProc::spawn`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// An environment variable the parent set for the child.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

/// Prints a protocol line to the parent.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "MN:{line}");
    let _ = out.flush();
}

/// Lines from the parent on stdin, read by a background thread.
pub fn stdin_lines() -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `word` from the parent (60 s at most).
#[track_caller]
pub fn wait_for(rx: &Receiver<String>, word: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == word => return,
            Ok(_) => continue,
            Err(_) => panic!("child: no `{word}` from the parent"),
        }
    }
}

/// A child process running one child test of this binary, killed if still running on drop.
pub struct ChildProc {
    pub name: String,
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
    /// The child's EAL file prefix, if any: its runtime directory is removed if the child
    /// fails or has to be killed.
    prefix: Option<String>,
}

/// The protocol part of a child's stdout line (libtest may print `test x ... ` before it on
/// the same line).
fn protocol(line: &str) -> Option<&str> {
    line.find("MN:").map(|at| &line[at + 3..])
}

impl ChildProc {
    /// Runs child test `test` (optionally inside network namespace `netns`) with `envs`.
    pub fn spawn(test: &str, envs: &[(&str, String)], netns: Option<&str>) -> ChildProc {
        let direct = self_test(test);
        let mut cmd = match netns {
            // `ip netns exec` executes the test binary in its own place: the pid is the child's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(direct.get_program()).args(direct.get_args());
                c
            }
            None => direct,
        };
        cmd.env(CHILD_ENV, "1").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = ChildGuard::spawn(&mut cmd, test);
        let stdout = Lines::new(child.child().stdout.take().expect("piped"));
        let stderr = Lines::new(child.child().stderr.take().expect("piped"));
        let stdin = child.child().stdin.take();
        let prefix = envs.iter().find(|(k, _)| *k == "MN_PREFIX").map(|(_, v)| v.clone());
        ChildProc { name: test.to_string(), child, stdin, stdout, stderr, prefix }
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.seen()
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.seen()
    }

    /// Waits for a protocol line starting with `word`; returns the rest of it. Fails when the
    /// child exits first (at once) or after `timeout`.
    #[track_caller]
    pub fn expect(&mut self, word: &str, timeout: Duration) -> String {
        let is_word = |l: &str| protocol(l).is_some_and(|m| m.starts_with(word));
        if let Some(l) = self.stdout.wait_for(timeout, is_word) {
            return protocol(&l).and_then(|m| m.strip_prefix(word)).unwrap_or_default().trim().to_string();
        }
        // The pipe closes as the child exits: give the exit a moment to be seen.
        let how = match self.child.wait_timeout(Duration::from_secs(1)) {
            Some(st) => format!("exited ({st}) before `{word}`"),
            None => format!("no `{word}` within {timeout:?}"),
        };
        panic!("{}: {how}\nstdout:\n{}\nstderr:\n{}", self.name, self.stdout(), self.stderr())
    }

    /// Sends a command line to the child.
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Waits for the child to exit (killing it and failing after `timeout`), then for its
    /// output to be read.
    #[track_caller]
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let Some(st) = self.child.wait_timeout(timeout) else {
            self.child.kill();
            panic!("{}: did not exit within {timeout:?}; killed\nstderr:\n{}", self.name, self.stderr());
        };
        let drained = Duration::from_secs(2);
        self.stdout.wait_closed(drained);
        self.stderr.wait_closed(drained);
        st
    }

    /// Waits for a successful exit, failing with the child's output otherwise. A successful
    /// child must not have logged an error (EAL runs with `--log-level=error`).
    #[track_caller]
    pub fn wait_success(&mut self, timeout: Duration) {
        let st = self.wait(timeout);
        assert!(st.success(), "{} failed ({st:?})\nstdout:\n{}\nstderr:\n{}", self.name, self.stdout(), self.stderr());
        let err = self.stderr();
        assert!(!err.contains("rror"), "{} logged an error:\n{err}", self.name);
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let ok = self.child.try_status().is_some_and(|st| st.success());
        self.child.kill();
        if let (false, Some(p)) = (ok, &self.prefix) {
            let _ = std::fs::remove_dir(Path::new("/var/run/dpdk").join(p));
        }
    }
}

/// A directory removed (with its contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("machnet-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails unless DPDK left nothing behind for `prefix`: no runtime directory under
/// `/var/run/dpdk` (= `/run/dpdk`), nothing in `/dev/shm` or `/dev/hugepages` naming it.
#[track_caller]
pub fn assert_no_dpdk_leftovers(prefix: &str) {
    let runtime = Path::new("/var/run/dpdk").join(prefix);
    assert!(!runtime.exists(), "DPDK left {} behind", runtime.display());
    for dir in ["/dev/shm", "/dev/hugepages", "/run"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(!name.contains(prefix), "DPDK left {dir}/{name} behind");
            }
        }
    }
}

/// Fails the test, saying what is missing, unless this runs as root with `ip` available.
#[track_caller]
pub fn require_root_and_ip() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this DPDK test needs root (network namespaces, veth, raw sockets); the `dpdk` feature is on but the test \
         runs as uid {euid}"
    );
    let ok = Command::new("ip").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "this DPDK test needs the `ip` command (iproute2), which is not available");
}

/// Runs `ip <args>` (bounded: it should take milliseconds).
#[track_caller]
fn run_ip(args: &[&str]) -> std::process::Output {
    output_within(Command::new("ip").args(args), Duration::from_secs(30), &format!("ip {}", args.join(" ")))
}

/// Runs `ip <args>`, failing the test with its output on error.
#[track_caller]
pub fn ip(args: &[&str]) {
    let out = run_ip(args);
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Output of `ip <args>`.
#[track_caller]
pub fn ip_output(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ip(args).stdout).into_owned()
}

/// Network namespaces created by a test, deleted on drop (which also deletes the interfaces
/// inside them, veth peers included), even when the test fails.
pub struct Netns {
    pub names: Vec<String>,
}

impl Netns {
    /// Creates one namespace per tag, named `mn-<tag>-<pid>-<n>` (`n` counts this process's
    /// calls: tests running in parallel threads get their own), with `lo` up.
    pub fn create(tags: &[&str]) -> Netns {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut ns = Netns { names: Vec::new() };
        for t in tags {
            let name = format!("mn-{t}-{}-{seq}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            ip(&["netns", "add", &name]);
            ns.names.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns
    }
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A raw IPv4 socket for `proto` with a 200 ms receive timeout.
pub fn raw_socket(proto: i32) -> i32 {
    // SAFETY: plain socket creation; the descriptor is closed by the caller.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, proto) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            core::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// An IPv4 socket address with port 0.
pub fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}

/// Sends `data` to `to` on a raw socket.
pub fn send_raw(fd: i32, to: Ipv4Addr, data: &[u8]) {
    let sa = sockaddr(to);
    // SAFETY: `data` and `sa` are valid for the call.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            core::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(n, data.len() as isize, "sendto: {}", std::io::Error::last_os_error());
}

/// Receives from a raw socket (`None` on timeout).
pub fn recv_raw(fd: i32, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n > 0).then_some(n as usize)
}
