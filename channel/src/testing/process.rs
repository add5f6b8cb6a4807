//! Child processes in tests: never left running, never waited on without a bound.
//!
//! * [`ChildGuard`] kills and reaps its child when dropped (also when the test panics), and
//!   waits for it only with a deadline.
//! * [`output_within`] runs a command to completion or kills it at a deadline, reading its
//!   output on threads so a full pipe cannot block it.
//! * [`Lines`] reads a child's output line by line on a thread, so a test can wait for a
//!   line ("listening on 127.0.0.1:PORT") with a bound.
//!
//! Every failure names what was waited for and shows what the child printed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
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
    seen: Vec<String>,
}

impl Lines {
    /// Starts reading `pipe` (a child's stdout or stderr).
    pub fn new(pipe: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Reads to the end even after the receiver is gone, so the child never blocks on
            // a full pipe.
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// Waits at most `limit` for a line that `pred` accepts and returns it; `None` at the
    /// deadline or when the pipe closed (the child exited) first.
    pub fn wait_for(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.seen.push(l.clone());
                    if hit {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Every line read so far (for failure messages).
    pub fn seen(&mut self) -> String {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
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
        assert!(lines.seen().contains('a'));
        drop(g);
    }
}
