//! Child processes in tests: never left running, never waited on without a bound.
//!
//! * [`ChildGuard`] kills and reaps its child when dropped (also when the test panics), and
//!   waits for it only with a deadline.
//! * [`output_within`] runs a command to completion or kills it at a deadline, reading its
//!   output on threads so a full pipe cannot block it.
//! * [`Lines`] reads a child's output line by line on a thread, so a test can wait for a
//!   line ("listening on 127.0.0.1:PORT") with a bound.
//! * [`with_free_udp_ports`] hands out UDP ports for programs that must know each other's
//!   port before either starts, and starts again with new ones when a port was taken meanwhile.
//! * [`self_test`] re-runs the current test binary as a child executing one (ignored) test.
//! * [`libmachnet_dir`] builds the C library (`libmachnet.{a,so}`) for tests of C programs.
//!
//! Every failure names what was waited for and shows what the child printed.

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd`; `what` names it in failure messages.
    #[track_caller]
    pub fn spawn(cmd: &mut Command, what: &str) -> ChildGuard {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        ChildGuard { child: Some(child), what: what.to_string() }
    }

    /// Wraps a child spawned elsewhere.
    pub fn new(child: Child, what: &str) -> ChildGuard {
        ChildGuard { child: Some(child), what: what.to_string() }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The child (its pipes, `try_wait`).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child was already reaped")
    }

    /// Whether it has exited (reaping it if so).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` (a `libc::SIG*` number).
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with a pid this guard spawned and has not reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        }
    }

    /// Waits at most `limit` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits at most `limit` for the child to exit; kills it and panics otherwise.
    #[track_caller]
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        match self.wait_timeout(limit) {
            Some(st) => st,
            None => {
                self.kill();
                panic!("{} did not exit within {:.1} s", self.what, limit.as_secs_f64());
            }
        }
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Collects the child's output (its stdout and stderr must be piped), waiting at most
    /// `limit` for it to exit; kills it and panics with what it printed otherwise.
    #[track_caller]
    pub fn output_within(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("the child was already reaped");
        let out = Collector::start(&mut child);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                let (stdout, stderr) = out.finish();
                return Output { status, stdout, stderr };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let (stdout, stderr) = out.finish();
                panic!(
                    "{} did not finish within {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.what,
                    limit.as_secs_f64(),
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a reader thread collected so far.
type Collected = Arc<Mutex<Vec<u8>>>;

/// Reads a child's stdout and stderr on two threads until they close.
struct Collector {
    threads: Vec<(JoinHandle<()>, Collected)>,
}

impl Collector {
    fn start(child: &mut Child) -> Collector {
        let mut threads = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let b = buf.clone();
            let t = std::thread::spawn(move || {
                if let Some(mut p) = pipe {
                    let mut chunk = [0u8; 4096];
                    while let Ok(n) = p.read(&mut chunk) {
                        if n == 0 {
                            break;
                        }
                        b.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                    }
                }
            });
            threads.push((t, buf));
        }
        Collector { threads }
    }

    /// What was read; waits briefly for the readers (a grandchild may keep a pipe open).
    fn finish(self) -> (Vec<u8>, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut out = Vec::new();
        for (t, buf) in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            out.push(std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner())));
        }
        let stderr = out.pop().unwrap_or_default();
        let stdout = out.pop().unwrap_or_default();
        (stdout, stderr)
    }
}

/// Runs `cmd` (stdout and stderr captured) to completion within `limit`; kills it and panics
/// naming `what` and showing its output otherwise.
#[track_caller]
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    ChildGuard::spawn(cmd, what).output_within(limit)
}

/// Lines of a child's output, read on a thread.
#[derive(Debug)]
pub struct Lines {
    rx: Receiver<String>,
    seen: Collected,
}

impl Lines {
    /// Starts reading `pipe` (a child's stdout or stderr).
    pub fn new(pipe: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        let seen = Collected::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            // Reads to the end even after the receiver is gone, so the child never blocks on
            // a full pipe.
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.extend_from_slice(line.as_bytes());
                log.push(b'\n');
                drop(log);
                let _ = tx.send(line);
            }
        });
        Lines { rx, seen }
    }

    /// Waits at most `limit` for a line that `pred` accepts and returns it; `None` at the
    /// deadline or when the pipe closed (the child exited) first. Lines before it are
    /// passed over (but stay in [`seen`](Self::seen)).
    pub fn wait_for(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits at most `limit` for the pipe to close (the writer exited), passing over what is
    /// left to read (it stays in [`seen`](Self::seen)); whether it closed.
    pub fn wait_closed(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Like [`wait_for`](Self::wait_for), but a miss fails the test: the message says what
    /// was awaited, whether `child` (the writer) exited first or time ran out, and shows every
    /// line read.
    #[track_caller]
    pub fn expect(
        &mut self,
        child: &mut ChildGuard,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(l) = self.wait_for(limit, pred) {
            return l;
        }
        // The pipe closes as the child exits: give the exit a moment to be seen.
        let how = match child.wait_timeout(Duration::from_secs(1)) {
            Some(st) => format!("exited ({st}) without printing {what}"),
            None => format!("did not print {what} within {:.1} s", limit.as_secs_f64()),
        };
        panic!("{} {how}; its output:\n{}", child.what, self.seen())
    }

    /// Every line read so far (for failure messages).
    pub fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Whether a program's output says it could not bind its address because another socket has
/// it (the `EADDRINUSE` message).
pub fn port_taken(output: &str) -> bool {
    output.contains("Address already in use")
}

/// Two UDP ports on 127.0.0.1 that were free a moment ago (they are free again when this
/// returns, so another test can take one meanwhile: see [`with_free_udp_ports`]).
pub fn free_udp_ports() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1");
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1");
    (a.local_addr().expect("local address").port(), b.local_addr().expect("local address").port())
}

/// How often [`with_free_udp_ports`] tries.
const PORT_TRIES: usize = 5;

/// Starts programs on two UDP ports from [`free_udp_ports`]: for programs that need each
/// other's port before either starts, so none can bind port 0 and report it. `start` returns
/// `Err(why)` when a program found its port taken (see [`port_taken`]) and cleans up what it
/// started; then it runs again with new ports, a few times at most. Any other failure should
/// panic in `start`.
#[track_caller]
pub fn with_free_udp_ports<T>(what: &str, mut start: impl FnMut(u16, u16) -> Result<T, String>) -> T {
    let mut why = String::new();
    for _ in 0..PORT_TRIES {
        let (a, b) = free_udp_ports();
        match start(a, b) {
            Ok(t) => return t,
            Err(e) => {
                eprintln!("{what}: a port was taken, trying other ports: {e}");
                why = e;
            }
        }
    }
    panic!("{what}: a port was taken in each of {PORT_TRIES} tries; the last time: {why}")
}

/// The current test binary, set to run only the `#[ignore]`d test `entry` (with its output
/// not captured, on one thread): a child process that is a test of its own.
pub fn self_test(entry: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut c = Command::new(exe);
    c.args(["--exact", entry, "--ignored", "--nocapture", "--test-threads=1"]);
    c
}

/// How long building the C library may take (a cold build on a busy machine).
const CARGO_BUILD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The directory with `libmachnet.a` and `libmachnet.so` built from the current sources, built
/// once per test process. `cargo test` builds this crate only as an rlib, so a nested cargo
/// builds the C artifacts into a target directory of their own (`<target>/capi-lib`, next to
/// the test binary's profile directory, so it shares no lock with the outer build).
pub fn libmachnet_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Test binaries run as <target>/<profile>/deps/<name>-<hash>.
        let exe = std::env::current_exe().expect("the test binary's path");
        let target = exe.ancestors().nth(3).expect("<target>/<profile>/deps/<test>").join("capi-lib");
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let out = output_within(
            Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--lib", "--manifest-path"])
                .arg(&manifest)
                .arg("--target-dir")
                .arg(&target)
                .env_remove("CARGO_TARGET_DIR"),
            CARGO_BUILD_LIMIT,
            "cargo build of libmachnet",
        );
        assert!(out.status.success(), "building libmachnet failed:\n{}", String::from_utf8_lossy(&out.stderr));
        target.join("debug")
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_returns_output_and_kills_a_hung_child() {
        let out =
            output_within(Command::new("sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(10), "sh");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| {
            output_within(
                Command::new("sh").args(["-c", "echo before; sleep 30"]),
                Duration::from_millis(300),
                "sleeper",
            )
        });
        let msg = *r.expect_err("a hung child fails").downcast::<String>().unwrap();
        assert!(msg.contains("sleeper did not finish within 0.3 s") && msg.contains("before"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(5), "the sleeper was killed");
    }

    #[test]
    fn lines_wait_for_a_line_or_give_up() {
        let mut g = ChildGuard::spawn(
            Command::new("sh").args(["-c", "echo a; echo 'port 42'; sleep 30"]).stdout(Stdio::piped()),
            "sh",
        );
        let mut lines = Lines::new(g.child().stdout.take().unwrap());
        assert_eq!(lines.wait_for(Duration::from_secs(10), |l| l.starts_with("port")).as_deref(), Some("port 42"));
        assert_eq!(lines.wait_for(Duration::from_millis(100), |l| l == "never"), None);
        assert_eq!(lines.seen(), "a\nport 42\n");
        // A child that exits without the line: the failure says so at once, with its output.
        let t = Instant::now();
        let r = std::panic::catch_unwind(move || {
            let mut quitter = ChildGuard::spawn(
                Command::new("sh").args(["-c", "echo bye; exit 3"]).stdout(Stdio::piped()),
                "quitter",
            );
            let mut lines = Lines::new(quitter.child().stdout.take().unwrap());
            lines.expect(&mut quitter, Duration::from_secs(30), "hello", |l| l == "hello")
        });
        let msg = *r.expect_err("no such line").downcast::<String>().unwrap();
        assert!(msg.contains("quitter exited (exit status: 3) without printing hello") && msg.contains("bye"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(10), "noticed the exit, not the deadline");
        drop(g);
    }

    #[test]
    fn free_udp_ports_are_tried_again_when_taken_and_not_for_ever() {
        let mut tries = 0;
        let (a, b) = with_free_udp_ports("pair", |a, b| {
            tries += 1;
            if tries == 1 {
                Err("cannot bind: Address already in use".into())
            } else {
                Ok((a, b))
            }
        });
        assert_eq!(tries, 2);
        assert_ne!(a, b);
        assert!(port_taken("udp backend: cannot bind 127.0.0.1:1: Address already in use (os error 98)"));
        let r = std::panic::catch_unwind(|| with_free_udp_ports("unlucky", |_, _| Err::<(), _>("taken".into())));
        let msg = *r.expect_err("gives up").downcast::<String>().unwrap();
        assert!(msg.contains("unlucky: a port was taken in each of 5 tries; the last time: taken"), "{msg}");
    }
}
