//! Access control attacked for real (issue 14, item 4). A local user made for each test, and
//! removed after it whatever happens, tries what another user of the host could: register
//! with the daemon, attach a channel, reach another application's channel memory (through
//! /proc, pidfd_getfd, ptrace, process_vm_readv, shared-memory files and inherited
//! descriptors), and send on or close another application's flow, with the access list
//! (`machnet_rs.access`) refusing it and allowing it. Every refusal must be a clear error to
//! the caller, logged by the daemon, and unnoticed by the victim.
//!
//! These tests must run as root (they create users); as anyone else they say so and pass.

mod common;

use common::*;
use machnet::client::Machnet;
use machnet::ctrl::{CallError, CtrlClient, KIND_CREATE_CHANNEL, KIND_DETACH_CHANNEL, KIND_REGISTER, KIND_STATS};
use machnet::layout::MachnetFlow;
use machnet::ops::{EventKind, Status};
use machnet::testing::process::{output_within, self_test, ChildGuard, Lines};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PORT: u16 = 888;
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// How long a child may wait for the daemon's answers.
const CHILD_WAIT: Duration = Duration::from_secs(20);
const USER_PREFIX: &str = "machnet-t";

// --- the user ---------------------------------------------------------------------------------

/// useradd and userdel lock /etc/passwd: one at a time in this process.
static USERADD: Mutex<()> = Mutex::new(());
static USERS: AtomicU32 = AtomicU32::new(0);

/// A local system user (with its own group) made for one test, deleted on drop, also when
/// the test fails. Named `machnet-t<pid>-<n>`: unique per test process and per test.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// Runs a user-administration tool, again while another holds the passwd lock.
fn admin(args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let out = output_within(Command::new(args[0]).args(&args[1..]), RUN, args[0]);
        tries += 1;
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("lock") || tries == 20 {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `name:x:uid:gid:...` of a user, if it exists.
fn passwd_entry(name: &str) -> Option<(u32, u32)> {
    let out = output_within(Command::new("getent").args(["passwd", name]), RUN, "getent passwd");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    (out.status.success() && f.len() >= 4).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
}

/// Deletes a user and the group of the same name (if userdel left it). Returns what failed.
fn delete_user(name: &str) -> Option<String> {
    let mut failed = None;
    if passwd_entry(name).is_some() {
        let out = admin(&["userdel", name]);
        if !out.status.success() {
            failed = Some(format!("userdel {name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    let group = output_within(Command::new("getent").args(["group", name]), RUN, "getent group");
    if group.status.success() {
        let out = admin(&["groupdel", name]);
        if !out.status.success() {
            failed = Some(format!("groupdel {name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    failed
}

/// Deletes users that test processes no longer running left behind (killed before their
/// guards could run).
fn delete_stale_users() {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in passwd.lines().filter_map(|l| l.split(':').next()) {
        let Some(pid) = name.strip_prefix(USER_PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting {name}, left behind by test process {pid}");
            let _ = delete_user(name);
        }
    }
}

impl TestUser {
    /// Creates the user, or `None` when this process is not root (the test cannot run).
    fn create() -> Option<TestUser> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a user needs root");
            return None;
        }
        for tool in ["/usr/sbin/useradd", "/usr/sbin/userdel", "/usr/sbin/groupdel"] {
            assert!(Path::new(tool).exists(), "{tool} is missing (Debian: apt-get install passwd)");
        }
        let _one = USERADD.lock().unwrap_or_else(|e| e.into_inner());
        delete_stale_users();
        let name = format!("{USER_PREFIX}{}-{}", std::process::id(), USERS.fetch_add(1, Ordering::Relaxed));
        // Left over from an earlier test process with the same pid.
        if let Some(why) = delete_user(&name) {
            panic!("cannot delete the stale user {name}: {why}");
        }
        let out = admin(&["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", &name]);
        // From here on the guard deletes the user, whatever fails next.
        let mut user = TestUser { name, uid: u32::MAX, gid: u32::MAX };
        assert!(out.status.success(), "useradd {}: {}", user.name, String::from_utf8_lossy(&out.stderr));
        (user.uid, user.gid) = passwd_entry(&user.name).expect("the new user's passwd entry");
        assert!(user.uid != 0 && user.gid != 0, "{} is uid {} gid {}", user.name, user.uid, user.gid);
        eprintln!("created user {} (uid {}, gid {})", user.name, user.uid, user.gid);
        Some(user)
    }

    /// `cmd`, run as this user with its own group and no others.
    fn run<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        as_user(cmd, self.uid, self.gid, &[])
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _one = USERADD.lock().unwrap_or_else(|e| e.into_inner());
        match delete_user(&self.name) {
            None => eprintln!("deleted user {}", self.name),
            // Not a panic: this may run while the test unwinds.
            Some(why) => eprintln!("WARNING: the test user is left behind: {why}"),
        }
    }
}

/// `cmd` run as `uid`, with primary group `gid` and exactly the supplementary `groups`.
fn as_user<'c>(cmd: &'c mut Command, uid: u32, gid: u32, groups: &[u32]) -> &'c mut Command {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the closure runs in the child between fork and exec; it calls only setgroups,
    // setgid and setuid (async-signal-safe) on a vector allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

// --- helpers ----------------------------------------------------------------------------------

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The `machnet_rs.access` fragment for [`Daemon::pair_with`].
fn access(uids: &[u32], gids: &[u32]) -> String {
    format!(r#", "access": {{"allow_uids": {uids:?}, "allow_gids": {gids:?}}}"#)
}

/// Runs the ignored test `entry` as a child with `env`, prepared by `user`; returns its output
/// (it must exit 0) and the pid it printed.
#[track_caller]
fn child(entry: &str, env: &[(&str, String)], user: impl FnOnce(&mut Command) -> &mut Command) -> (String, u32) {
    let mut cmd = self_test(entry);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(user(&mut cmd), RUN, entry);
    let s = text(&out);
    assert!(out.status.success(), "{entry} failed ({}):\n{s}", out.status);
    let pid = s
        .lines()
        .find_map(|l| l.strip_prefix("child pid "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{entry} did not print its pid:\n{s}"));
    (s, pid)
}

#[track_caller]
fn expect_line(out: &str, line: &str) {
    assert!(out.lines().any(|l| l.trim() == line), "expected the line {line:?} in:\n{out}");
}

/// Waits (10 s at most) for a log line of `d` containing every one of `needles`.
#[track_caller]
fn expect_log(d: &Daemon, needles: &[&str]) -> String {
    let t = Instant::now();
    loop {
        if let Some(l) = d.log_text().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return l.to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no log line with {needles:?}:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn flow_env(f: MachnetFlow) -> String {
    format!("{},{},{},{}", f.src_ip, f.dst_ip, f.src_port, f.dst_port)
}

fn flow_from_env(s: &str) -> MachnetFlow {
    let v: Vec<u32> = s.split(',').map(|x| x.parse().unwrap()).collect();
    MachnetFlow { src_ip: v[0], dst_ip: v[1], src_port: v[2] as u16, dst_port: v[3] as u16 }
}

/// Asserts the daemon process still runs and answers (it must outlive every refusal).
#[track_caller]
fn assert_alive(d: &Daemon) {
    assert!(Path::new(&format!("/proc/{}", d.pid())).exists(), "machnetd {} is gone:\n{}", d.ip, d.log_text());
    let st = ctl_json(&d.sock, "status");
    assert_eq!(st["status"]["pid"], d.pid(), "{st}");
}

/// `machnetctl status` run as `uid`, `gid`, `groups`.
fn machnetctl_as(sock: &Path, uid: u32, gid: u32, groups: &[u32]) -> Output {
    output_within(as_user(&mut machnetctl_command(sock, &["status"]), uid, gid, groups), RUN, "machnetctl as the user")
}

/// The next message on `ch` within `limit`.
fn recv(ch: &mut machnet::client::Channel, buf: &mut [u8], limit: Duration) -> Option<(usize, MachnetFlow)> {
    ch.recv_blocking(buf, Some(limit)).unwrap()
}

// --- what the attacker tries on memory --------------------------------------------------------

/// What another user might try to reach the channel memory process `pid` holds: each of its
/// memfd descriptors through /proc and pidfd_getfd, each memfd mapping through map_files and
/// process_vm_readv, its memory file, ptrace, and any named shared-memory file it holds. One
/// attempt a line (`kind args`), as `child_snoop` reads them.
fn memory_attempts(pid: u32) -> Vec<String> {
    let mut v = vec![format!("list /proc/{pid}/fd"), format!("open-ro /proc/{pid}/mem"), format!("ptrace {pid}")];
    // Descriptors and mappings of memfds.
    let mut memfds = 0;
    let mut named = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else { continue };
        let link = link.to_string_lossy().into_owned();
        let n = e.file_name().to_string_lossy().into_owned();
        if link.starts_with("/memfd:") {
            memfds += 1;
            for kind in ["open-rw", "open-ro", "readlink"] {
                v.push(format!("{kind} /proc/{pid}/fd/{n}"));
            }
            v.push(format!("getfd {pid} {n}"));
        } else if link.starts_with("/dev/shm/") || link.starts_with("/dev/hugepages") {
            named.push(link);
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let path = f.get(5..).map(|p| p.join(" ")).unwrap_or_default();
        if path.starts_with("/memfd:") {
            memfds += 1;
            let (lo, _) = f[0].split_once('-').unwrap();
            v.push(format!("open-rw /proc/{pid}/map_files/{}", f[0]));
            v.push(format!("vmread {pid} {}", u64::from_str_radix(lo, 16).unwrap()));
        } else if path.starts_with("/dev/shm/") || path.starts_with("/dev/hugepages") {
            named.push(path);
        }
    }
    assert!(memfds > 0, "process {pid} holds no memfd: nothing to attack");
    named.sort();
    named.dedup();
    for p in named {
        let p = p.trim_end_matches(" (deleted)").to_string();
        v.push(format!("open-rw {p}"));
        v.push(format!("open-ro {p}"));
    }
    v
}

/// Files under /dev/shm and /dev/hugepages that name machnet (the daemon and library create
/// none: channels are memfds; any that exists must be closed to other users too).
fn named_shm_attempts() -> Vec<String> {
    let mut v = Vec::new();
    for dir in ["/dev/shm", "/dev/hugepages"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().to_lowercase().contains("machnet") {
                v.push(format!("open-rw {}", e.path().display()));
                v.push(format!("open-ro {}", e.path().display()));
            }
        }
    }
    v
}

/// Runs `child_snoop` as `user` on `attempts`; asserts each was refused with EACCES or EPERM
/// and that the child inherited none of this (root) process's channel descriptors.
#[track_caller]
fn snoop(user: &TestUser, sock: &Path, attempts: &[String]) -> String {
    // This process holds its channels' doorbells (eventfds) as the child starts: what it
    // must not inherit.
    let bells = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("eventfd")))
        .count();
    assert!(bells > 0, "this process holds no doorbell: the inheritance check would test nothing");
    let env = [("MACHNET_TEST_SOCK", sock.display().to_string()), ("MACHNET_TEST_ATTEMPTS", attempts.join("\n"))];
    let (out, _) = child("child_snoop", &env, |c| user.run(c));
    eprintln!("what another user tried, and what the kernel said:\n{out}");
    for a in attempts {
        let l = out
            .lines()
            .find(|l| l.strip_prefix(a.as_str()).is_some_and(|r| r.starts_with(": ")))
            .unwrap_or_else(|| panic!("child_snoop did not report {a:?}:\n{out}"));
        assert!(
            l.ends_with(": denied EACCES") || l.ends_with(": denied EPERM"),
            "SECURITY: another user's attempt was not refused with EACCES/EPERM: {l}\n{out}"
        );
    }
    assert!(
        !out.lines().any(|l| l.starts_with("inherited ")),
        "SECURITY: a child run as another user inherited channel descriptors:\n{out}"
    );
    out
}

// --- the tests --------------------------------------------------------------------------------

#[test]
fn a_user_off_the_access_list_is_refused_cleanly_logged_and_harmless() {
    let Some(user) = TestUser::create() else { return };
    // A allows uid 4242 and group 4242 (and root); the user is neither. B has no list.
    let (a, b) = Daemon::pair_with(&access(&[4242], &[4242]), "");
    let server = echo_server_on(&b, PORT, u64::MAX);
    let m = a.app();
    let mut victim = m.attach().unwrap();
    let flow = victim.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut victim, flow, 1, 1000, 20, 4);

    // Registration, channels, another's channel and statistics: all refused, none fatal.
    let env = [
        ("MACHNET_TEST_SOCK", a.sock.display().to_string()),
        ("MACHNET_TEST_CHANNEL", victim.id().unwrap().to_string()),
    ];
    let (out, pid) = child("child_register", &env, |c| user.run(c));
    expect_line(&out, &format!("creds uid {} gid {} groups []", user.uid, user.gid));
    expect_line(&out, "register: refused: daemon refused: not permitted");
    expect_line(&out, "raw register: NotPermitted");
    expect_line(&out, "raw create_channel: NotRegistered");
    expect_line(&out, &format!("raw detach_channel {}: NotRegistered", victim.id().unwrap()));
    expect_line(&out, "raw stats: NotPermitted");
    let l = expect_log(&a, &["registration refused", &format!("pid {pid} uid {} gid {}", user.uid, user.gid)]);
    assert!(l.contains("WARN") && l.contains("not on the access list"), "{l}");
    expect_log(&a, &["statistics refused", &format!("pid {pid} uid {} gid {}", user.uid, user.gid)]);

    // machnetctl as the user: refused with a clear message, logged.
    let out = machnetctl_as(&a.sock, user.uid, user.gid, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not on its access list"), "{}", text(&out));
    let refusals = || a.log_text().lines().filter(|l| l.contains(&format!("uid {} gid", user.uid))).count();
    let t = Instant::now();
    while refusals() < 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "not every refusal was logged:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl_json(&a.sock, "status")["status"]["access_refused"], 4, "two registrations, two statistics");
    assert_eq!(ctl_json(&a.sock, "status")["status"]["apps"], 1, "only the victim is registered");

    // Nor can the refused user reach the victim's or the daemon's channel memory.
    let mut attempts = memory_attempts(std::process::id());
    attempts.extend(memory_attempts(a.pid()));
    attempts.extend(named_shm_attempts());
    let out = snoop(&user, &a.sock, &attempts);
    expect_line(&out, "own channel: refused: daemon refused: not permitted");

    // The daemon runs on, and the victim noticed nothing.
    assert_alive(&a);
    ping_pong(&mut victim, flow, 2, 1000, 20, 4);
    assert!(a.log_text().lines().all(|l| !l.contains("ERROR")), "{}", a.log_text());
    drop((victim, m, a, b));
    let _ = server.join();
}

#[test]
fn a_user_on_the_access_list_by_uid_or_group_registers_attaches_and_transfers() {
    let Some(user) = TestUser::create() else { return };
    // (what, access list, the child's primary group, its supplementary groups, allowed)
    let cases = [
        ("by uid", access(&[user.uid], &[]), user.gid, vec![], true),
        ("by primary group", access(&[], &[user.gid]), user.gid, vec![], true),
        ("by supplementary group", access(&[], &[user.gid]), NOGROUP, vec![user.gid], true),
        ("in no allowed group", access(&[], &[user.gid]), NOGROUP, vec![], false),
    ];
    for (what, list, gid, groups, allowed) in cases {
        eprintln!("--- the user {what}");
        let (a, b) = Daemon::pair_with(&list, "");
        let server = echo_server_on(&b, PORT, u64::MAX);
        let env = [("MACHNET_TEST_SOCK", a.sock.display().to_string()), ("MACHNET_TEST_PORT", PORT.to_string())];
        let (out, pid) = child("child_ping_pong", &env, |c| as_user(c, user.uid, gid, &groups));
        expect_line(&out, &format!("creds uid {} gid {gid} groups {groups:?}", user.uid));
        let who = format!("pid {pid} uid {} gid {gid}", user.uid);
        let ctl = machnetctl_as(&a.sock, user.uid, gid, &groups);
        if allowed {
            expect_line(&out, "ping-pong ok: 200 messages on its own flow");
            expect_log(&a, &["registered:", &who]);
            assert!(ctl.status.success(), "{what}: {}", text(&ctl));
        } else {
            expect_line(&out, "register: refused: daemon refused: not permitted");
            expect_log(&a, &["registration refused", &who]);
            assert_eq!(ctl.status.code(), Some(1), "{what}: {}", text(&ctl));
            assert!(text(&ctl).contains("not on its access list"), "{what}: {}", text(&ctl));
        }
        assert_alive(&a);
        drop((a, b));
        // The flow was real: the peer's echo server answered each of the child's messages.
        let echoed = server.join().unwrap();
        assert_eq!(echoed, if allowed { 200 } else { 0 }, "{what}: messages echoed");
    }
}

#[test]
fn another_user_cannot_reach_a_channels_memory() {
    let Some(user) = TestUser::create() else { return };
    // The user is allowed (with a channel of its own): the stronger position to attack from.
    let (a, b) = Daemon::pair_with(&access(&[user.uid, NOBODY], &[]), "");
    let server = echo_server_on(&b, PORT, u64::MAX);
    // Victim 1: this process (root).
    let m = a.app();
    let mut victim = m.attach().unwrap();
    let flow = victim.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut victim, flow, 1, 1000, 20, 4);
    // Victim 2: an application of a third user (nobody): an ordinary user's memory.
    let mut cmd = self_test("child_victim");
    cmd.env("MACHNET_TEST_SOCK", &a.sock).stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut v2 = ChildGuard::spawn(as_user(&mut cmd, NOBODY, NOGROUP, &[]), "the victim run as nobody");
    let mut v2_out = Lines::new(v2.child().stdout.take().unwrap());
    v2_out.expect(&mut v2, CHILD_WAIT, "victim ready", |l| l == "victim ready");

    let mut attempts = memory_attempts(std::process::id());
    attempts.extend(memory_attempts(v2.id()));
    attempts.extend(memory_attempts(a.pid()));
    attempts.extend(named_shm_attempts());
    let out = snoop(&user, &a.sock, &attempts);
    expect_line(&out, "own channel: attached");
    eprintln!("{} attempts on the memory of three processes, every one refused", attempts.len());

    // Both victims carry on.
    ping_pong(&mut victim, flow, 2, 1000, 20, 4);
    writeln!(v2.child().stdin.as_mut().unwrap(), "go").unwrap();
    v2_out.expect(&mut v2, CHILD_WAIT, "victim ok", |l| l == "victim ok");
    assert!(v2.wait_within(CHILD_WAIT).success(), "{}", v2_out.seen());
    assert_alive(&a);
    drop((victim, m, a, b));
    let _ = server.join();
}

#[test]
fn another_users_application_cannot_send_on_close_or_detach_what_it_does_not_own() {
    let Some(user) = TestUser::create() else { return };
    let (a, b) = Daemon::pair_with(&access(&[user.uid], &[]), "");
    // The victim's peer keeps what it receives.
    let mb = b.app();
    let mut peer = mb.attach().unwrap();
    peer.listen(IP_B, PORT).unwrap();
    let m = a.app();
    let mut victim = m.attach().unwrap();
    let flow = victim.connect(IP_A, IP_B, PORT).unwrap();
    let mut buf = [0u8; 256];
    victim.send(flow, b"genuine 1").unwrap();
    let (n, from) = recv(&mut peer, &mut buf, CHILD_WAIT).expect("the victim's first message");
    assert_eq!((&buf[..n], from), (&b"genuine 1"[..], flow));

    // The attacker knows the victim's flow (machnetctl flows shows it to any allowed user).
    const FORGED: u32 = 12;
    let env = [
        ("MACHNET_TEST_SOCK", a.sock.display().to_string()),
        ("MACHNET_TEST_FLOW", flow_env(flow)),
        ("MACHNET_TEST_CHANNEL", victim.id().unwrap().to_string()),
        ("MACHNET_TEST_COUNT", FORGED.to_string()),
    ];
    let (out, pid) = child("child_forge", &env, |c| user.run(c));
    expect_line(&out, &format!("refused {FORGED} of {FORGED}: TxRefused NotPermitted"));
    expect_line(&out, "close: daemon refused: not permitted");
    expect_line(&out, &format!("raw detach_channel {}: NoSuchChannel", victim.id().unwrap()));

    // Logged, once and then at 10 (not twelve lines), naming the flow.
    let reg = expect_log(&a, &["registered:", &format!("pid {pid} uid {}", user.uid)]);
    let app = reg.split_once(" registered:").and_then(|(l, _)| l.split_whitespace().last()).unwrap().to_string();
    let tuple = format!("{IP_A}:{} -> {IP_B}:{PORT} refused, not its flow", flow.src_port);
    let l = expect_log(&a, &[&format!("of app {app}:"), &tuple, "(not permitted; 1 so far"]);
    assert!(l.contains("WARN"), "{l}");
    expect_log(&a, &[&format!("of app {app}:"), &tuple, "(not permitted; 10 so far"]);
    let lines = a.log_text().lines().filter(|l| l.contains(&tuple)).count();
    assert_eq!(lines, 2, "{FORGED} refusals, two log lines:\n{}", a.log_text());
    let c = ctl_json(&a.sock, "channels");
    assert_eq!(c["shards"][0]["counters"]["tx_refused"], FORGED, "{c}");

    // The forged bytes never reached the victim's peer; the victim's own go on, both ways.
    victim.send(flow, b"genuine 2").unwrap();
    let (n, from) = recv(&mut peer, &mut buf, CHILD_WAIT).expect("the victim's second message");
    assert_eq!((&buf[..n], from), (&b"genuine 2"[..], flow), "the next thing the peer received");
    assert!(recv(&mut peer, &mut buf, Duration::from_millis(300)).is_none(), "the peer received more");
    peer.send(reverse(from), b"reply").unwrap();
    let (n, _) = recv(&mut victim, &mut buf, CHILD_WAIT).expect("the peer's reply");
    assert_eq!(&buf[..n], b"reply");
    assert!(victim.poll_event().is_none(), "the victim saw no event");
    let f = ctl_json(&a.sock, "flows");
    let vf = f["flows"].as_array().unwrap().iter().find(|x| x["local"] == format!("{IP_A}:{}", flow.src_port));
    let vf = vf.unwrap_or_else(|| panic!("the victim's flow is gone: {f}"));
    assert_eq!((vf["state"].as_str(), vf["tx_msgs"].as_u64()), (Some("Established"), Some(2)), "{vf}");
    assert_alive(&a);
    drop((victim, m, peer, mb, a, b));
}

// --- children ---------------------------------------------------------------------------------

/// Prints the child's pid and credentials (from /proc/self/status), on lines of their own
/// (after the harness's unfinished "test ... " line).
fn print_creds() {
    println!("\nchild pid {}", std::process::id());
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| -> Vec<u32> {
        let l = st.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default();
        l.split_whitespace().filter_map(|x| x.parse().ok()).collect()
    };
    println!("creds uid {} gid {} groups {:?}", field("Uid:")[0], field("Gid:")[0], field("Groups:"));
}

fn status_of<T>(r: Result<T, CallError>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(CallError::Status(s)) => format!("{s:?}"),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
#[ignore = "entry point of a child process: registration and the control protocol, refused"]
fn child_register() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let victim: u64 = std::env::var("MACHNET_TEST_CHANNEL").unwrap().parse().unwrap();
    print_creds();
    match Machnet::connect(Path::new(&sock)) {
        Err(e) => println!("register: refused: {e}"),
        Ok(_) => println!("register: ok"),
    }
    // The protocol by hand: what a client that ignores the first refusal could try.
    let mut c = CtrlClient::connect(Path::new(&sock), CHILD_WAIT).unwrap();
    println!("raw register: {}", status_of(c.call(KIND_REGISTER, 0)));
    println!("raw create_channel: {}", status_of(c.call(KIND_CREATE_CHANNEL, 0)));
    println!("raw detach_channel {victim}: {}", status_of(c.call(KIND_DETACH_CHANNEL, victim)));
    println!("raw stats: {}", status_of(c.call(KIND_STATS, 0)));
}

#[test]
#[ignore = "entry point of a child process: an application on its own flow"]
fn child_ping_pong() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let port: u16 = std::env::var("MACHNET_TEST_PORT").unwrap().parse().unwrap();
    print_creds();
    let m = match Machnet::connect(Path::new(&sock)) {
        Err(e) => return println!("register: refused: {e}"),
        Ok(m) => m,
    };
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, port).unwrap();
    ping_pong(&mut ch, flow, 3, 1000, 200, 8);
    println!("ping-pong ok: 200 messages on its own flow");
}

#[test]
#[ignore = "entry point of a child process: an application of another user to attack"]
fn child_victim() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let m = Machnet::connect(Path::new(&sock)).unwrap();
    let mut ch = m.attach().unwrap();
    let flow = ch.connect(IP_A, IP_B, PORT).unwrap();
    ping_pong(&mut ch, flow, 7, 1000, 20, 4);
    println!("\nvictim ready");
    // The parent says when the attack is over (or dies, closing the pipe, and kills us).
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    ping_pong(&mut ch, flow, 8, 1000, 20, 4);
    println!("victim ok");
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::EBADF => "EBADF".into(),
        e => format!("errno {e}"),
    }
}

/// `denied <errno>` for a failed system call's result, `ALLOWED` otherwise.
fn verdict(failed: bool) -> String {
    if failed {
        format!("denied {}", errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)))
    } else {
        "ALLOWED".into()
    }
}

fn io_verdict<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ALLOWED".into(),
        Err(e) => format!("denied {}", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

/// One attempt on another process's memory (see [`memory_attempts`]).
fn attempt(a: &str) -> String {
    let (kind, arg) = a.split_once(' ').unwrap();
    let num = |i: usize| -> i64 { arg.split(' ').nth(i).unwrap().parse().unwrap() };
    match kind {
        "list" => io_verdict(std::fs::read_dir(arg)),
        "readlink" => io_verdict(std::fs::read_link(arg)),
        "open-rw" => io_verdict(std::fs::File::options().read(true).write(true).open(arg)),
        "open-ro" => match std::fs::File::open(arg) {
            // Opening is enough of a hole; reading shows it was not an empty file.
            Ok(f) => {
                let mut b = [0u8; 64];
                format!("ALLOWED (read {:?} bytes)", std::os::unix::fs::FileExt::read_at(&f, &mut b, 0).ok())
            }
            Err(e) => format!("denied {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        "getfd" => {
            // SAFETY: pidfd_open(pid, flags) takes integers only.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, num(0), 0) };
            if pidfd < 0 {
                return format!("pidfd_open {}", verdict(true));
            }
            // SAFETY: pidfd_getfd(pidfd, targetfd, flags) takes integers only.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, num(1), 0) };
            let v = verdict(fd < 0);
            // SAFETY: closing descriptors this function opened.
            unsafe {
                if fd >= 0 {
                    libc::close(fd as i32);
                }
                libc::close(pidfd as i32);
            }
            v
        }
        "vmread" => {
            let mut b = [0u8; 64];
            let local = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() };
            let remote = libc::iovec { iov_base: num(1) as usize as *mut libc::c_void, iov_len: b.len() };
            // SAFETY: one local iovec over `b`; the remote one is only read by the kernel, which
            // checks the permission first.
            let n = unsafe { libc::process_vm_readv(num(0) as libc::pid_t, &local, 1, &remote, 1, 0) };
            verdict(n < 0)
        }
        "ptrace" => {
            let pid = num(0) as libc::pid_t;
            // SAFETY: PTRACE_SEIZE does not stop the tracee; detached at once if it worked.
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            let v = verdict(r < 0);
            if r == 0 {
                // SAFETY: detaches the tracee this call seized.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
            }
            v
        }
        k => panic!("unknown attempt {k:?}"),
    }
}

#[test]
#[ignore = "entry point of a child process: another user going for channel memory"]
fn child_snoop() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let attempts = std::env::var("MACHNET_TEST_ATTEMPTS").unwrap();
    print_creds();
    // What a root application's helper run as another user would inherit.
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let link = std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        if link.starts_with("/memfd:") || link.contains("eventfd") {
            println!("inherited {} -> {link}", e.file_name().to_string_lossy());
        }
    }
    // Its own channel, if the access list allows (it then holds memfds of its own).
    let own = Machnet::connect(Path::new(&sock)).and_then(|m| Ok((m.attach()?, m)));
    match &own {
        Ok(_) => println!("own channel: attached"),
        Err(e) => println!("own channel: refused: {e}"),
    }
    for a in attempts.lines() {
        println!("{a}: {}", attempt(a));
    }
}

#[test]
#[ignore = "entry point of a child process: another user going for another application's flow"]
fn child_forge() {
    let Ok(sock) = std::env::var("MACHNET_TEST_SOCK") else { return };
    let flow = flow_from_env(&std::env::var("MACHNET_TEST_FLOW").unwrap());
    let victim: u64 = std::env::var("MACHNET_TEST_CHANNEL").unwrap().parse().unwrap();
    let count: u32 = std::env::var("MACHNET_TEST_COUNT").unwrap().parse().unwrap();
    print_creds();
    let m = Machnet::connect(Path::new(&sock)).unwrap();
    let mut ch = m.attach().unwrap();
    for k in 0..count {
        // Queued locally (the library cannot know the flow is not ours), refused by the daemon.
        send_retry(&mut ch, flow, format!("forged {k}").as_bytes());
    }
    let (mut refused, mut other) = (0, Vec::new());
    let t = Instant::now();
    while refused + other.len() < count as usize && t.elapsed() < CHILD_WAIT {
        match ch.poll_event() {
            Some(ev) if ev.kind == EventKind::TxRefused && ev.status == Status::NotPermitted && ev.flow == flow => {
                refused += 1
            }
            Some(ev) => other.push(ev),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    println!("refused {refused} of {count}: TxRefused NotPermitted");
    for ev in other {
        println!("other event: {ev:?}");
    }
    match ch.close(flow) {
        Ok(()) => println!("close: ok"),
        Err(e) => println!("close: {e}"),
    }
    // A second registration asks the daemon to detach the victim's channel by its id.
    let mut c = CtrlClient::connect(Path::new(&sock), CHILD_WAIT).unwrap();
    println!("raw register: {}", status_of(c.call(KIND_REGISTER, 0)));
    println!("raw detach_channel {victim}: {}", status_of(c.call(KIND_DETACH_CHANNEL, victim)));
}
