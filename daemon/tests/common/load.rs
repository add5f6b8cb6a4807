//! A busy machine for tests: CPU-burning processes at normal priority on every CPU, daemons
//! pinned to one CPU each (as on a shared VM where the daemon and its applications share a
//! core with other work), and bounded `machnetctl` calls.

use super::{Daemon, Gone, TempDir, IP_A, IP_B, READY};
use machnet::testing::process::{output_within, port_taken, with_free_udp_ports, ChildGuard};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPUs of this machine.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU hogs: `per_cpu` busy shell loops pinned to every CPU, killed when dropped.
pub struct Hogs(Vec<ChildGuard>);

impl Hogs {
    pub fn start(per_cpu: usize) -> Hogs {
        let mut v = Vec::new();
        for cpu in 0..cpus() {
            for _ in 0..per_cpu {
                v.push(ChildGuard::spawn(
                    Command::new("taskset")
                        .args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                    "CPU hog",
                ));
            }
        }
        Hogs(v)
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// Pins the calling thread to `cpu` (modulo the CPU count).
pub fn pin_thread(cpu: usize) {
    let id = core_affinity::CoreId { id: cpu % cpus() };
    assert!(core_affinity::set_for_current(id), "cannot pin a test thread to CPU {}", id.id);
}

impl Daemon {
    /// Starts `machnetd` on the udp backend with the whole process (shards and controller)
    /// pinned to `cpu` through `taskset` and `cpu_mask`; `extra` as in [`Daemon::try_start`].
    /// `Err` if its UDP port was taken.
    pub fn try_start_pinned(
        tag: &str,
        ip: std::net::Ipv4Addr,
        mac: &str,
        ports: (u16, u16),
        cpu: usize,
        extra: &str,
    ) -> Result<Daemon, String> {
        let cpu = cpu % cpus();
        let dir = TempDir::new(tag);
        let cfg = dir.0.join("config.json");
        let (bind, peer) = ports;
        std::fs::write(
            &cfg,
            format!(
                r#"{{"machnet_config": {{"{mac}": {{"ip": "{ip}", "cpu_mask": "{:#x}"}}}},
                   "machnet_rs": {{"udp": {{"bind": "127.0.0.1:{bind}", "peers": ["127.0.0.1:{peer}"]}},
                                   "idle": "adaptive" {extra}}}}}"#,
                1u64 << cpu
            ),
        )
        .unwrap();
        let mut d =
            Daemon { child: None, sock: dir.0.join("ctrl.sock"), log: dir.0.join("machnetd.log"), ip, _dir: dir };
        d.child = Some(d.spawn_pinned(cpu, false));
        match d.until(READY, |d| d.sock.exists()) {
            Ok(()) => Ok(d),
            Err(Gone::Exited(_)) if port_taken(&d.log_text()) => {
                Err(format!("machnetd {ip} could not bind 127.0.0.1:{bind}: {}", d.log_text().trim()))
            }
            Err(why) => d.failed(why, "its control socket"),
        }
    }

    /// `taskset -c CPU machnetd` with this daemon's configuration, socket and log.
    fn spawn_pinned(&self, cpu: usize, append_log: bool) -> ChildGuard {
        let log = if append_log {
            std::fs::OpenOptions::new().append(true).open(&self.log).unwrap()
        } else {
            std::fs::File::create(&self.log).unwrap()
        };
        ChildGuard::spawn(
            Command::new("taskset")
                .args(["-c", &(cpu % cpus()).to_string(), env!("CARGO_BIN_EXE_machnetd")])
                .arg("--config")
                .arg(self._dir.0.join("config.json"))
                .arg("--ctrl-sock")
                .arg(&self.sock)
                .arg("--log-level")
                .arg(std::env::var("MACHNETD_LOG").unwrap_or_else(|_| "info".into()))
                .stdout(Stdio::null())
                .stderr(log),
            &format!("machnetd {}", self.ip),
        )
    }

    /// A pair like [`Daemon::pair`], A pinned to CPU 0 and B to CPU 1.
    pub fn pair_pinned(extra: &str) -> (Daemon, Daemon) {
        with_free_udp_ports("a pinned machnetd pair", |pa, pb| {
            let a = Daemon::try_start_pinned("a", IP_A, "02:00:00:00:00:01", (pa, pb), 0, extra)?;
            let b = Daemon::try_start_pinned("b", IP_B, "02:00:00:00:00:02", (pb, pa), 1, extra)?;
            Ok((a, b))
        })
    }

    /// Starts the daemon again with the same configuration, control socket and log (after
    /// [`kill`](Daemon::kill)), pinned to `cpu`.
    pub fn respawn_pinned(&mut self, cpu: usize) {
        assert!(self.child.is_none(), "respawn of a running daemon");
        // The killed daemon left its socket file: wait for the new one's.
        let _ = std::fs::remove_file(&self.sock);
        self.child = Some(self.spawn_pinned(cpu, true));
        self.wait_ready();
    }

    /// `machnetctl --json WHAT`, which must answer within `limit`.
    pub fn ctl_within(&self, what: &str, limit: Duration) -> Value {
        ctl_json_within(&self.sock, what, limit)
    }

    /// SIGTERM, then how long the daemon took to exit (it must exit 0 within `limit`; if it
    /// does not, the failure shows where its threads were).
    pub fn stop_within(&mut self, limit: Duration) -> Duration {
        let pid = self.pid();
        let t = Instant::now();
        self.terminate();
        let mut child = self.child.take().expect("running");
        match child.wait_timeout(limit) {
            Some(st) => {
                assert!(st.success(), "machnetd {} exited with {st}: {}", self.ip, self.log_text());
                t.elapsed()
            }
            None => {
                let stacks = thread_stacks(pid);
                child.kill();
                panic!(
                    "machnetd {} did not stop within {limit:?} of SIGTERM; its threads:\n{stacks}\nlog:\n{}",
                    self.ip,
                    self.log_text()
                );
            }
        }
    }
}

/// Every thread of `pid` with its state and kernel stack (what a stuck process is waiting for).
pub fn thread_stacks(pid: u32) -> String {
    let mut s = String::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return s };
    for t in dir.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.split(' ').next()).unwrap_or("?").to_string();
        let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
        s.push_str(&format!("  {} {} [{state}]\n{stack}", t.file_name().to_string_lossy(), comm.trim()));
    }
    s
}

/// `machnetctl --json WHAT` against `sock`, answered within `limit`.
pub fn ctl_json_within(sock: &Path, what: &str, limit: Duration) -> Value {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_machnetctl")).arg("--ctrl-sock").arg(sock).args(["--json", what]),
        limit,
        &format!("machnetctl {what}"),
    );
    assert!(out.status.success(), "machnetctl {what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
