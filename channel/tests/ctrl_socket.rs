//! The control socket protocol against the test engine: registration with peer credentials,
//! channel creation with descriptors, detach, malformed requests, socket file handling.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use machnet::client::{Error, Machnet};
use machnet::ctrl::{
    CallError, CtrlClient, CtrlMsg, CtrlServer, CTRL_MSG_LEN, KIND_CREATE_CHANNEL, KIND_DETACH_CHANNEL, KIND_ERROR,
    KIND_REGISTER, KIND_REPLY,
};
use machnet::ops::Status;
use machnet::testing::{unique_path, TestEngine, TestEngineConfig};

fn engine() -> TestEngine {
    TestEngine::start(TestEngineConfig::default()).unwrap()
}

/// The first connection to `listener`; fails if none comes within `limit`.
#[track_caller]
fn accept_within(listener: &std::os::unix::net::UnixListener, limit: Duration) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no client connected within {limit:?}: {e}"),
        }
    }
}

fn raw_call(s: &mut UnixStream, bytes: &[u8; CTRL_MSG_LEN]) -> CtrlMsg {
    s.write_all(bytes).unwrap();
    let mut b = [0u8; CTRL_MSG_LEN];
    s.read_exact(&mut b).unwrap();
    CtrlMsg::decode(&b).unwrap()
}

#[test]
fn register_records_peer_credentials() {
    let eng = engine();
    let m = Machnet::connect(eng.socket_path()).unwrap();
    let me = m.registration();
    assert_eq!(me.pid, std::process::id());
    // SAFETY: getuid/getgid cannot fail.
    assert_eq!((me.uid, me.gid), unsafe { (libc::getuid(), libc::getgid()) });
    assert!(eng.registrations().iter().any(|(_, c)| c.pid == std::process::id()));
}

#[test]
fn create_channel_passes_a_sealed_memfd_and_detach_reclaims_it() {
    let eng = engine();
    let m = Machnet::connect(eng.socket_path()).unwrap();
    let mut ch = m.attach().unwrap();
    let id = ch.id().unwrap();
    assert_eq!(ch.layout().cfg, machnet::ChannelConfig::DEFAULT);
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.live_channels() == 1));
    // The channel works end to end through the engine.
    let f = ch.connect([198, 18, 0, 1].into(), [198, 18, 0, 2].into(), 7000).unwrap();
    ch.send(f, b"hello").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(ch.recv_blocking(&mut buf, Some(Duration::from_secs(10))).unwrap(), Some((5, f.reversed())));
    ch.detach().unwrap();
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().iter().any(|r| r.channel == id)));
    let r = eng.reclaimed().into_iter().find(|r| r.channel == id).unwrap();
    assert_eq!((r.after.tx_reclaimed, r.after.rx_free), (r.after.tx_bufs, r.after.rx_bufs));
    assert_eq!(eng.live_channels(), 0);
}

#[test]
fn every_request_gets_an_answer_even_a_malformed_one() {
    let eng = engine();
    let mut s = UnixStream::connect(eng.socket_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Before registering: channel requests are refused.
    let r = raw_call(&mut s, &CtrlMsg::request(KIND_CREATE_CHANNEL, 1).encode());
    assert_eq!((r.kind, r.seq, r.status), (KIND_CREATE_CHANNEL | KIND_REPLY, 1, Status::NotRegistered.code()));
    // Garbage (bad magic): an error reply echoing the sequence number.
    let mut junk = [0xA5u8; CTRL_MSG_LEN];
    junk[8..12].copy_from_slice(&42u32.to_le_bytes());
    let r = raw_call(&mut s, &junk);
    assert_eq!((r.kind, r.seq, r.status), (KIND_ERROR, 42, Status::BadRequest.code()));
    // Unsupported version.
    let mut v9 = CtrlMsg::request(KIND_REGISTER, 3).encode();
    v9[4] = 9;
    let r = raw_call(&mut s, &v9);
    assert_eq!((r.kind, r.status), (KIND_ERROR, Status::BadVersion.code()));
    // Unknown kind.
    let r = raw_call(&mut s, &CtrlMsg::request(0x77, 4).encode());
    assert_eq!((r.kind, r.status), (0x77 | KIND_REPLY, Status::BadRequest.code()));
    // A request split across two writes is reassembled.
    let reg = CtrlMsg::request(KIND_REGISTER, 5).encode();
    s.write_all(&reg[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    s.write_all(&reg[10..]).unwrap();
    let mut b = [0u8; CTRL_MSG_LEN];
    s.read_exact(&mut b).unwrap();
    let r = CtrlMsg::decode(&b).unwrap();
    assert_eq!((r.kind, r.seq, r.status), (KIND_REGISTER | KIND_REPLY, 5, Status::Ok.code()));
    assert_eq!(r.pid, std::process::id());
    let r = raw_call(&mut s, &CtrlMsg::request(KIND_REGISTER, 6).encode());
    assert_eq!(r.status, Status::AlreadyRegistered.code());
    // Detaching a channel that is not ours.
    let mut d = CtrlMsg::request(KIND_DETACH_CHANNEL, 6);
    d.channel = 12345;
    let r = raw_call(&mut s, &d.encode());
    assert_eq!(r.status, Status::NoSuchChannel.code());
}

#[test]
fn closing_the_registration_reclaims_all_channels_of_the_app() {
    let eng = engine();
    let m = Machnet::connect(eng.socket_path()).unwrap();
    let a = m.attach().unwrap();
    let b = m.attach().unwrap();
    let ids = [a.id().unwrap(), b.id().unwrap()];
    // The registration connection ends (as when the process dies) before any detach.
    // SAFETY: shutdown of a socket this test owns.
    assert_eq!(unsafe { libc::shutdown(m.ctrl_fd(), libc::SHUT_RDWR) }, 0);
    assert!(eng.wait_until(Duration::from_secs(10), |e| e.reclaimed().len() == 2));
    assert!(a.is_closed() && b.is_closed(), "the app can see its channels are gone");
    drop((a, b, m)); // their detach requests fail quietly
    let mut got: Vec<u64> = eng.reclaimed().iter().map(|r| r.channel).collect();
    got.sort_unstable();
    assert_eq!(got, ids);
    assert_eq!(eng.live_channels(), 0);
}

#[test]
fn no_daemon_is_an_error_not_a_hang() {
    let p = unique_path("nobody.sock");
    assert_eq!(Machnet::connect(&p).unwrap_err(), Error::Os(libc::ENOENT));
}

#[test]
fn socket_file_lifecycle() {
    let dir = unique_path("ctrl-dir");
    let path = dir.join("sub").join("machnet_ctrl.sock");
    // Parent directories are created; mode is applied.
    let s = CtrlServer::bind_with_mode(&path, 0o660).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A live server is not replaced.
    assert_eq!(CtrlServer::bind(&path).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    drop(s);
    assert!(!path.exists(), "removed on drop");
    // A stale socket file (nobody listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let s = CtrlServer::bind(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o666);
    drop(s);
    // A regular file is never deleted.
    std::fs::write(&path, b"not a socket").unwrap();
    assert_eq!(CtrlServer::bind(&path).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reply_that_missed_its_timeout_does_not_derail_later_calls() {
    // A slow server: the first reply comes 750 ms late, after the client gave up on it (at
    // 500 ms) and while its second call waits; that call must get its own reply.
    let path = unique_path("late-reply");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        // Every wait of this server is bounded, so joining it is too.
        let mut s = accept_within(&listener, Duration::from_secs(10));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = |s: &mut UnixStream, n: u32| {
            let mut b = [0u8; CTRL_MSG_LEN];
            s.read_exact(&mut b).unwrap_or_else(|e| panic!("server: call {n} did not come within 10 s: {e}"));
            CtrlMsg::decode(&b).unwrap()
        };
        let first = request(&mut s, 1);
        std::thread::sleep(Duration::from_millis(750));
        s.write_all(&first.reply(Status::Ok).encode()).unwrap();
        let mut r = request(&mut s, 2).reply(Status::Ok);
        r.channel = 42;
        s.write_all(&r.encode()).unwrap();
        // A torn reply: half a message, then silence.
        let third = request(&mut s, 3);
        s.write_all(&third.reply(Status::Ok).encode()[..20]).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
    });
    let mut c = CtrlClient::connect(&path, Duration::from_millis(500)).unwrap();
    match c.call(KIND_DETACH_CHANNEL, 1) {
        Err(CallError::Io(e)) => assert!(matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let (m, _) = c.call(KIND_DETACH_CHANNEL, 2).expect("the second call gets its own reply");
    assert_eq!(m.channel, 42);
    assert!(matches!(c.call(KIND_DETACH_CHANNEL, 3), Err(CallError::Io(_))), "torn reply: timeout");
    match c.call(KIND_DETACH_CHANNEL, 4) {
        Err(CallError::Io(e)) => assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}"),
        other => panic!("a torn stream must be reported broken, got {other:?}"),
    }
    server.join().expect("the slow server failed (its panic is above)");
    let _ = std::fs::remove_file(&path);
}
