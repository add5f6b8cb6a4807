//! The engine side and the client over one channel in one process (no control socket):
//! round trips, back-pressure, leaks, validation of hostile shared memory, control queue,
//! doorbells and reclaiming.

mod common;

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{cuts, gather, pattern, scatter, Rng};
use machnet::client::{Channel, Error};
use machnet::engine::{DeliverError, EngineChannel, TxMsg, Violation};
use machnet::layout::{ChannelConfig, CtrlEntry, MachnetFlow, MsgDesc, Part, MSG_FLAG_NOTIFY_DELIVERY, MSG_MAX_LEN};
use machnet::ops::{CtrlOp, Event, EventKind, Status};
use machnet::testing::RawView;

const FLOW: MachnetFlow = MachnetFlow { src_ip: 0xC612_0001, dst_ip: 0xC612_0002, src_port: 1024, dst_port: 888 };

fn small() -> ChannelConfig {
    ChannelConfig { mss: 1418, tx_bufs: 64, rx_bufs: 64, tx_ring: 16, rx_ring: 8, ctrl_ring: 16 }
}

fn pair(cfg: &ChannelConfig) -> (EngineChannel, Channel) {
    let (e, fds) = EngineChannel::create(cfg, "test", false).unwrap();
    (e, Channel::from_fds(fds).unwrap())
}

/// Echo one accepted message back (copying each segment into an RX buffer), as an engine whose
/// peer echoes would; frees the TX buffers. Returns the delivered message length.
fn echo(e: &mut EngineChannel, m: TxMsg) -> Result<(), DeliverError> {
    let mut seg = Some(m.head);
    let mut scratch = vec![0u8; e.mss()];
    let (mut head, mut prev) = (u32::MAX, None);
    while let Some(i) = seg {
        let n = e.read_seg(i, &mut scratch);
        let rx = e.alloc_rx(&scratch[..n]).expect("rx buffer");
        match prev {
            Some(p) => assert!(e.link_rx(p, rx)),
            None => head = rx,
        }
        prev = Some(rx);
        seg = e.seg_next(i);
    }
    e.free_tx_chain(m.head);
    e.flush();
    e.deliver(m.flow.reversed(), head, m.count, m.len)
}

#[test]
fn messages_of_every_shape_round_trip_with_scatter_gather() {
    let (mut e, mut app) = pair(&ChannelConfig::DEFAULT);
    let mss = e.mss();
    let data = pattern(MSG_MAX_LEN + 4096, 1);
    let mut rng = Rng(7);
    let mut sizes = vec![1, 2, mss - 1, mss, mss + 1, 2 * mss, 3 * mss - 1, MSG_MAX_LEN];
    sizes.extend((0..40).map(|_| rng.log_uniform(1 << 20)));
    let mut out = vec![0u8; MSG_MAX_LEN];
    for (k, len) in sizes.into_iter().enumerate() {
        let off = rng.range(0, 4096);
        let msg = &data[off..off + len];
        let flags = if k % 2 == 0 { MSG_FLAG_NOTIFY_DELIVERY } else { 0 };
        app.sendmsg(FLOW, &gather(msg, &cuts(&mut rng, len, 16)), flags).unwrap();
        let m = e.poll_tx().unwrap().unwrap();
        assert_eq!((m.flow, m.len as usize, m.count as usize, m.flags), (FLOW, len, len.div_ceil(mss), flags));
        echo(&mut e, m).unwrap();
        let c = cuts(&mut rng, len, 16);
        let mut iov = scatter(&mut out[..len], &c);
        let (n, from) = app.recvmsg(&mut iov).unwrap().unwrap();
        assert_eq!((n, from), (len, FLOW.reversed()));
        assert!(out[..len] == *msg, "content of message {k} ({len} B)");
    }
    let s = e.stats();
    assert_eq!((s.tx_engine, s.tx_app, s.rx_engine, s.rx_app, s.rx_free), (0, s.tx_bufs, 0, 0, s.rx_bufs));
    assert_eq!(app.tx_free_buffers(), s.tx_bufs as usize, "every TX buffer came back");
    assert_eq!(s.violations_total(), 0);
}

#[test]
fn two_max_size_messages_fit_in_flight_each_way_by_default() {
    let (mut e, mut app) = pair(&ChannelConfig::DEFAULT);
    let msg = pattern(MSG_MAX_LEN, 3);
    app.send(FLOW, &msg).unwrap();
    app.send(FLOW, &msg).unwrap();
    let a = e.poll_tx().unwrap().unwrap();
    let b = e.poll_tx().unwrap().unwrap();
    echo(&mut e, a).unwrap();
    echo(&mut e, b).unwrap();
    let mut out = vec![0u8; MSG_MAX_LEN];
    for _ in 0..2 {
        assert_eq!(app.recv(&mut out).unwrap().unwrap().0, MSG_MAX_LEN);
        assert!(out == msg);
    }
}

#[test]
fn invalid_lengths_are_refused_and_consume_nothing() {
    let (_e, mut app) = pair(&small());
    let free = app.tx_free_buffers();
    assert_eq!(app.send(FLOW, &[]), Err(Error::InvalidLength));
    let big = vec![0u8; MSG_MAX_LEN + 1];
    assert_eq!(app.send(FLOW, &big), Err(Error::InvalidLength));
    assert_eq!(app.sendmsg(FLOW, &[IoSlice::new(&[]), IoSlice::new(&[])], 0), Err(Error::InvalidLength));
    // More than the pool can ever hold: no buffers.
    let too_many = vec![0u8; 65 * 1418];
    assert_eq!(app.send(FLOW, &too_many), Err(Error::NoBuffers));
    assert_eq!(app.tx_free_buffers(), free);
}

#[test]
fn full_ring_send_fails_and_leaks_nothing() {
    let cfg = small(); // 16-entry TX ring, 64 TX buffers
    let (mut e, mut app) = pair(&cfg);
    for i in 0..16u8 {
        app.send(FLOW, &[i; 100]).unwrap();
    }
    assert_eq!(app.tx_free_buffers(), 48);
    // The original leaked the buffers of every send refused by a full ring: repeat many times.
    for _ in 0..1000 {
        assert_eq!(app.send(FLOW, &[0; 3000]), Err(Error::RingFull));
    }
    assert_eq!(app.tx_free_buffers(), 48, "a refused send must not consume buffers");
    assert_eq!(app.stats().tx_ring_full, 1000);
    // The engine consumes and acknowledges everything: the pool is whole again.
    while let Some(m) = e.poll_tx() {
        e.free_tx_chain(m.unwrap().head);
    }
    e.flush();
    assert_eq!(app.tx_free_buffers(), 64);
    // ... and a message needing every buffer goes through.
    app.send(FLOW, &vec![7u8; 64 * 1418]).unwrap();
    let m = e.poll_tx().unwrap().unwrap();
    assert_eq!(m.count, 64);
    // Out of buffers now: NoBuffers, nothing consumed.
    assert_eq!(app.send(FLOW, &[1]), Err(Error::NoBuffers));
    e.free_tx_chain(m.head);
    e.flush();
    assert_eq!(app.tx_free_buffers(), 64);
}

#[test]
fn too_small_receive_discards_the_message_and_returns_its_buffers() {
    let (mut e, mut app) = pair(&small());
    let msg = pattern(5000, 9);
    app.send(FLOW, &msg).unwrap();
    let m = e.poll_tx().unwrap().unwrap();
    echo(&mut e, m).unwrap();
    assert_eq!(e.stats().rx_app, 4);
    let mut small_buf = [0u8; 4999];
    assert_eq!(app.recv(&mut small_buf), Err(Error::TooSmall { needed: 5000 }));
    assert_eq!(app.recv(&mut small_buf), Ok(None), "the message was discarded");
    let s = e.stats();
    assert_eq!((s.rx_app, s.rx_free), (0, 64), "its buffers went back to the engine");
    // The next message is received normally.
    app.send(FLOW, &msg).unwrap();
    let m = e.poll_tx().unwrap().unwrap();
    echo(&mut e, m).unwrap();
    let mut buf = [0u8; 5000];
    assert_eq!(app.recv(&mut buf).unwrap().unwrap().0, 5000);
    assert!(buf[..] == msg[..]);
    assert_eq!(app.stats().rx_too_small, 1);
}

#[test]
fn full_rx_ring_is_back_pressure_not_failure() {
    let cfg = small(); // 8-entry RX ring
    let (mut e, mut app) = pair(&cfg);
    for i in 0..8u8 {
        let b = e.alloc_rx(&[i; 10]).unwrap();
        e.deliver(FLOW, b, 1, 10).unwrap();
    }
    let b = e.alloc_rx(&[8; 10]).unwrap();
    let before = e.stats();
    assert_eq!(e.deliver(FLOW, b, 1, 10), Err(DeliverError::Full));
    let after = e.stats();
    assert_eq!((after.rx_engine, after.rx_app, after.rx_msgs), (before.rx_engine, before.rx_app, before.rx_msgs));
    assert_eq!(after.rx_full, 1);
    let mut buf = [0u8; 16];
    assert_eq!(app.recv(&mut buf).unwrap().unwrap().0, 10);
    e.deliver(FLOW, b, 1, 10).unwrap();
    for i in 1..9u8 {
        assert_eq!(app.recv(&mut buf).unwrap().unwrap(), (10, FLOW));
        assert_eq!(buf[0], i);
    }
    // A broken chain is refused and changes nothing.
    let a = e.alloc_rx(&[1; 10]).unwrap();
    assert_eq!(e.deliver(FLOW, a, 2, 10), Err(DeliverError::BadChain));
    assert_eq!(e.deliver(FLOW, a, 1, 11), Err(DeliverError::BadChain));
    assert!(e.free_rx(a));
    assert_eq!(e.stats().rx_free, 64);
}

#[test]
fn refused_message_returns_all_buffers_and_tells_the_app() {
    let (mut e, mut app) = pair(&small());
    app.send(FLOW, &[5u8; 4000]).unwrap();
    let m = e.poll_tx().unwrap().unwrap();
    assert_eq!(app.tx_free_buffers(), 61);
    e.refuse_tx(&m, Status::NoSuchFlow);
    e.flush();
    assert_eq!(app.tx_free_buffers(), 64);
    let ev = app.poll_event().unwrap();
    assert_eq!((ev.kind, ev.flow, ev.status, ev.aux), (EventKind::TxRefused, FLOW, Status::NoSuchFlow, 4000));
    let s = e.stats();
    assert_eq!((s.tx_app, s.tx_engine, s.refused), (64, 0, 1));
}

#[test]
fn engine_rejects_every_kind_of_bad_descriptor_and_keeps_the_pool_intact() {
    let cfg = small();
    let (mut e, fds) = EngineChannel::create(&cfg, "hostile", false).unwrap();
    let mut app = Channel::from_fds(e.app_fds().unwrap()).unwrap();
    drop(fds);
    let raw = RawView::map(e.memfd(), *e.layout()).unwrap();
    let d = |head, count, len| MsgDesc { flow: FLOW, head, count, len, flags: 0, reserved: 0 };
    let expect = |e: &mut EngineChannel, desc: MsgDesc, v: Violation| {
        raw.push_tx(desc);
        assert_eq!(e.poll_tx(), Some(Err(v)), "{desc:?}");
    };
    raw.set_buf(Part::TxPool, 0, 1, 1418);
    raw.set_buf(Part::TxPool, 1, 0, 1418); // 0 -> 1 -> 0: a cycle
    raw.set_buf(Part::TxPool, 2, 99, 10); // (ignored: single-buffer messages have no header)
    raw.set_buf(Part::TxPool, 3, 64, 1418); // next out of range
    raw.set_buf(Part::TxPool, 4, 5, 100); // not full, but not the last
    raw.set_buf(Part::TxPool, 5, u32::MAX, 1323);
    expect(&mut e, d(2, 1, 0), Violation::MsgLength);
    expect(&mut e, d(2, 1, MSG_MAX_LEN as u32 + 1), Violation::MsgLength);
    expect(&mut e, d(2, 2, 10), Violation::MsgLength);
    expect(&mut e, d(64, 1, 10), Violation::BufIndex);
    expect(&mut e, d(u32::MAX, 1, 10), Violation::BufIndex);
    expect(&mut e, d(3, 2, 1500), Violation::BufIndex);
    expect(&mut e, d(0, 3, 3 * 1418), Violation::BufOwner);
    expect(&mut e, d(4, 2, 1418 + 5), Violation::SegLength);
    expect(&mut e, d(0, 2, 1418 + 5), Violation::SegLength);
    // A valid one, then the same buffer again while the engine holds it.
    raw.push_tx(d(2, 1, 10));
    let m = e.poll_tx().unwrap().unwrap();
    assert_eq!((m.head, m.len), (2, 10));
    expect(&mut e, d(2, 1, 10), Violation::BufOwner);
    // After the bad ones, only the valid message's buffer is engine-held.
    let s = e.stats();
    assert_eq!((s.tx_engine, s.tx_app), (1, 63));
    // Changing the buffer after acceptance does not change what the engine sees.
    raw.set_buf(Part::TxPool, 2, 0, 1418);
    assert_eq!((e.seg_len(2), e.seg_next(2)), (10, None));
    // Returning RX buffers the app does not hold.
    raw.push_rx_return(5); // engine-free, not app-held
    raw.push_rx_return(1000); // out of range
    assert_eq!(e.rx_available(), 64);
    // Control: unknown opcode, id 0.
    raw.push_sq(CtrlEntry { id: 77, op: 99, ..Default::default() });
    raw.push_sq(CtrlEntry { id: 0, op: 1, ..Default::default() });
    assert_eq!(e.poll_ctrl(), Some(Err(Violation::CtrlRequest)));
    assert_eq!(e.poll_ctrl(), Some(Err(Violation::CtrlRequest)));
    let s = e.stats();
    let by = |v: Violation| s.violations[v as usize];
    assert_eq!(
        [Violation::MsgLength, Violation::BufIndex, Violation::BufOwner, Violation::SegLength].map(by),
        [3, 3, 2, 2]
    );
    assert_eq!((by(Violation::ReturnedBuf), by(Violation::CtrlRequest)), (2, 2));
    // The app learns about each violation as an event; the bad control request is answered.
    let mut violations = 0;
    while let Some(ev) = app.poll_event() {
        assert_eq!(ev.kind, EventKind::Violation);
        violations += 1;
    }
    assert_eq!(violations, 14);
    // A corrupted producer index poisons the channel: nothing more is read from it.
    let p = raw.read_u32(raw.prod_off(Part::TxRing));
    raw.write_u32(raw.prod_off(Part::TxRing), p.wrapping_add(1000));
    assert_eq!(e.poll_tx(), Some(Err(Violation::RingIndex)));
    assert!(e.is_poisoned());
    assert_eq!(e.poll_tx(), None);
    // Still, everything is accounted for.
    e.free_tx(2);
    let s = e.stats();
    assert_eq!(s.tx_app + s.tx_engine + s.tx_returning, 64);
    assert_eq!(s.rx_free, 64);
}

#[test]
fn control_requests_complete_by_id_and_events_interleave() {
    let (mut e, mut app) = pair(&small());
    let t = std::thread::spawn(move || {
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while served < 3 {
            assert!(Instant::now() < deadline, "engine thread: only {served} of 3 control requests came in 30 s");
            if let Some(Ok(req)) = e.poll_ctrl() {
                // An event before each answer: the app must queue it, not mistake it.
                e.post_event(Event { kind: EventKind::FlowClosed, flow: FLOW, status: Status::Closed, aux: served });
                let r = match req.op {
                    CtrlOp::Listen { port: 1, .. } => Err(Status::AddrInUse),
                    CtrlOp::Listen { ip, port } => Ok(MachnetFlow::new(ip, port, 0.into(), 0)),
                    CtrlOp::Connect { local_ip, remote_ip, remote_port } => {
                        Ok(MachnetFlow::new(local_ip, 4242, remote_ip, remote_port))
                    }
                    CtrlOp::Close { flow } => Ok(flow),
                };
                e.complete(req.id, r).unwrap();
                served += 1;
            }
            std::thread::yield_now();
        }
        e
    });
    let ip = std::net::Ipv4Addr::new(198, 18, 0, 1);
    app.listen(ip, 888).unwrap();
    assert_eq!(app.listen(ip, 1), Err(Error::Daemon(Status::AddrInUse)));
    let f = app.connect(ip, std::net::Ipv4Addr::new(198, 18, 0, 2), 999).unwrap();
    assert_eq!((f.src_port, f.dst_port, f.dst_ip), (4242, 999, 0xC612_0002));
    let mut e = t.join().unwrap();
    for i in 0..3 {
        assert_eq!(app.poll_event().map(|ev| ev.aux), Some(i));
    }
    assert_eq!(app.poll_event(), None);
    // Nobody answers: a bounded wait, then TimedOut; the late answer is ignored later.
    app.set_ctrl_timeout(Duration::from_millis(50));
    assert_eq!(app.close(FLOW), Err(Error::TimedOut));
    let late = e.poll_ctrl().unwrap().unwrap();
    e.complete(late.id, Ok(FLOW)).unwrap();
    app.set_ctrl_timeout(Duration::from_secs(5));
    let t = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(req)) = e.poll_ctrl() {
                e.complete(req.id, Err(Status::NoSuchFlow)).unwrap();
                return e;
            }
            assert!(Instant::now() < deadline, "engine thread: no close request came in 30 s");
            std::thread::yield_now();
        }
    });
    assert_eq!(app.close(FLOW), Err(Error::Daemon(Status::NoSuchFlow)), "the stale completion is skipped");
    t.join().unwrap();
}

#[test]
fn a_connect_that_succeeds_after_its_timeout_is_closed() {
    // The application was told the connect failed; the daemon opened the flow later. The flow
    // must not stay open unseen: the client asks the daemon to close it.
    let (mut e, mut app) = pair(&small());
    app.set_ctrl_timeout(Duration::from_millis(50));
    let (local, remote) = (std::net::Ipv4Addr::new(198, 18, 0, 1), std::net::Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(app.connect(local, remote, 999), Err(Error::TimedOut));
    let req = e.poll_ctrl().unwrap().unwrap();
    assert!(matches!(req.op, CtrlOp::Connect { remote_port: 999, .. }), "{req:?}");
    let late = MachnetFlow { src_ip: 0xC612_0001, dst_ip: 0xC612_0002, src_port: 4242, dst_port: 999 };
    e.complete(req.id, Ok(late)).unwrap();
    e.flush();
    assert_eq!(app.poll_event(), None, "a late completion is not an event");
    let close = e.poll_ctrl().expect("a close request").unwrap();
    assert_eq!(close.op, CtrlOp::Close { flow: late });
    e.complete(close.id, Ok(late)).unwrap();
    e.flush();
    // A late failure needs nothing; other requests go on normally.
    assert_eq!(app.connect(local, remote, 998), Err(Error::TimedOut));
    let req = e.poll_ctrl().unwrap().unwrap();
    e.complete(req.id, Err(Status::Refused)).unwrap();
    e.flush();
    assert_eq!(app.poll_event(), None);
    assert_eq!(e.poll_ctrl(), None, "nothing to close after a late failure");
}

#[test]
fn reading_a_full_completion_queue_wakes_a_sleeping_engine() {
    // More events than the CQ holds (16): the rest wait in the engine. The engine goes to
    // sleep; when the application makes room, its doorbell must wake the engine to send them.
    let (mut e, mut app) = pair(&small());
    for aux in 0..20 {
        e.post_event(Event { kind: EventKind::FlowClosed, flow: FLOW, status: Status::Closed, aux });
    }
    e.flush();
    assert!(e.prepare_sleep(), "nothing else to do");
    assert_eq!(app.poll_event().map(|ev| ev.aux), Some(0));
    assert!(
        machnet::shm::wait_readable(e.engine_bell(), Some(Duration::from_secs(10))).unwrap(),
        "the engine's doorbell rang"
    );
    e.finish_sleep();
    e.flush();
    let rest: Vec<u32> = std::iter::from_fn(|| app.poll_event().map(|ev| ev.aux)).collect();
    assert_eq!(rest, (1..20).collect::<Vec<_>>(), "every event, once, in order");
}

#[test]
fn sixty_four_control_requests_in_flight() {
    let cfg = ChannelConfig { ctrl_ring: 64, ..small() };
    let (mut e, fds) = EngineChannel::create(&cfg, "ctrl", false).unwrap();
    let raw = RawView::map(fds.memfd.as_fd(), *e.layout()).unwrap();
    for id in 1..=64u64 {
        raw.push_sq(CtrlOp::Listen { ip: [198, 18, 0, 1].into(), port: id as u16 }.encode(id));
    }
    let mut ids = Vec::new();
    while let Some(r) = e.poll_ctrl() {
        ids.push(r.unwrap().id);
    }
    assert_eq!(ids, (1..=64).collect::<Vec<_>>());
    // 64 completions fill the CQ; more go to the private overflow, none is lost.
    for id in ids {
        e.complete(id, Ok(FLOW)).unwrap();
    }
    for _ in 0..10 {
        e.post_event(Event { kind: EventKind::FlowFailed, flow: FLOW, status: Status::TimedOut, aux: 0 });
    }
    assert_eq!(raw.read_u32(raw.prod_off(Part::Cq)), 64, "all 64 completions are in the CQ");
    let mut app = Channel::from_fds(fds).unwrap();
    let mut events = 0;
    for _ in 0..10 {
        e.flush(); // drains the overflow as the app makes room
        while app.poll_event().is_some() {
            events += 1;
        }
    }
    assert_eq!(events, 10);
    assert_eq!(e.stats().events_dropped, 0);
}

#[test]
fn blocking_receive_sleeps_on_the_doorbell_and_wakes() {
    let (mut e, mut app) = pair(&small());
    let mut buf = [0u8; 64];
    assert_eq!(app.recv_blocking(&mut buf, Some(Duration::from_millis(30))), Ok(None), "times out when idle");
    let t = std::thread::spawn(move || {
        // Wait until the app sleeps, then deliver: only the doorbell can wake it before its
        // 100 ms re-check (a fixed delay here would race with that re-check).
        let t0 = Instant::now();
        while !e.app_asleep() {
            assert!(t0.elapsed() < Duration::from_secs(30), "the app never went to sleep");
            std::thread::sleep(Duration::from_micros(200));
        }
        let b = e.alloc_rx(b"wake up").unwrap();
        e.deliver(FLOW, b, 1, 7).unwrap();
        e.flush(); // the doorbell check is batched per poll round
        e
    });
    let r = app.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap();
    assert_eq!(r, Some((7, FLOW)));
    assert_eq!(&buf[..7], b"wake up");
    let mut e = t.join().unwrap();
    assert_eq!(e.stats().doorbells, 1, "the sleeping app was woken by its doorbell");
    // The engine's doorbell: rung by a send while the engine announced sleep.
    assert!(e.prepare_sleep());
    app.send(FLOW, b"x").unwrap();
    assert!(machnet::shm::wait_readable(e.engine_bell(), Some(Duration::from_secs(10))).unwrap());
    e.finish_sleep();
    assert!(!e.prepare_sleep(), "work is pending: do not sleep");
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn blocking_receive_sleeps_while_an_event_waits_unread() {
    // A server loops on recv_blocking and never polls events; its peer closes a flow. The
    // event must wait for poll_event without keeping the receiver awake.
    let (mut e, mut app) = pair(&small());
    let closed = Event { kind: EventKind::FlowClosed, flow: FLOW, status: Status::Closed, aux: 0 };
    e.post_event(closed);
    e.flush();
    let wall = Duration::from_millis(300);
    let cpu0 = thread_cpu_time();
    let mut buf = [0u8; 64];
    assert_eq!(app.recv_blocking(&mut buf, Some(wall)), Ok(None), "an event is not a message");
    let cpu = thread_cpu_time() - cpu0;
    assert!(cpu < wall / 3, "the receiver spun instead of sleeping: {cpu:?} of CPU in {wall:?}");
    assert_eq!(app.poll_event(), Some(closed), "the event is still there, once");
    assert_eq!(app.poll_event(), None);
}

#[test]
fn a_control_call_sleeps_while_a_message_waits_unread() {
    // A message sits in the receive ring; the application makes a control call the daemon
    // is slow to answer (here: never). The wait must sleep, not spin on the unread message.
    let (mut e, mut app) = pair(&small());
    let b = e.alloc_rx(b"unread").unwrap();
    e.deliver(FLOW, b, 1, 6).unwrap();
    e.flush();
    let wall = Duration::from_millis(300);
    app.set_ctrl_timeout(wall);
    let cpu0 = thread_cpu_time();
    assert_eq!(app.listen(std::net::Ipv4Addr::new(198, 18, 0, 1), 7), Err(Error::TimedOut));
    let cpu = thread_cpu_time() - cpu0;
    assert!(cpu < wall / 3, "the control call spun instead of sleeping: {cpu:?} of CPU in {wall:?}");
    let mut buf = [0u8; 16];
    assert_eq!(app.recv(&mut buf), Ok(Some((6, FLOW))), "the message is still there");
}

#[test]
fn reclaim_takes_back_every_buffer_wherever_it_is() {
    let (mut e, mut app) = pair(&small());
    for _ in 0..3 {
        app.send(FLOW, &[1u8; 3000]).unwrap(); // 3 buffers each
    }
    let m = e.poll_tx().unwrap().unwrap(); // engine holds 3; 6 queued (app-held)
    let rx = e.alloc_rx(&[2; 100]).unwrap();
    e.deliver(FLOW, rx, 1, 100).unwrap(); // app holds 1 RX
    let _partial = e.alloc_rx(&[3; 100]).unwrap(); // engine holds 1 RX
    let _ = m;
    let r = e.reclaim_all();
    assert_eq!((r.tx_app, r.tx_engine, r.rx_app, r.rx_engine), (61, 3, 1, 63));
    let s = e.stats();
    assert_eq!((s.tx_reclaimed, s.tx_app, s.tx_engine, s.rx_free, s.rx_app, s.rx_engine), (64, 0, 0, 64, 0, 0));
    assert!(app.is_closed());
    // What was delivered before can still be read; then the channel reports it is closed.
    let mut buf = [0u8; 128];
    assert_eq!(app.recv_blocking(&mut buf, Some(Duration::from_secs(5))), Ok(Some((100, FLOW))));
    assert_eq!(app.recv_blocking(&mut buf, Some(Duration::from_secs(5))), Err(Error::Closed));
    assert_eq!(app.send(FLOW, b"late"), Err(Error::Closed));
    assert_eq!(e.poll_tx(), None, "a dead channel accepts nothing");
}
