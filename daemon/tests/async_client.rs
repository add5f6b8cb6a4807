//! The asynchronous Rust client (`machnet::asyncio`, feature `tokio`) against real daemons on
//! the udp backend: the async_echo example with many flows on one task, `send` waiting for
//! buffers instead of failing, a peer that closes, a daemon that dies, and waiting without
//! spinning.

mod common;

#[path = "../../channel/examples/async_echo.rs"]
#[allow(dead_code)]
mod async_echo;

use common::*;
use machnet::asyncio::{AsyncChannel, Incoming};
use machnet::client::Error;
use machnet::EventKind;
use std::future::Future;
use std::time::Duration;

/// A current-thread runtime (one thread: everything below runs on one task).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Runs `f` to completion within `limit`; fails naming `what` otherwise.
#[track_caller]
fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    runtime().block_on(async {
        match tokio::time::timeout(limit, f).await {
            Ok(v) => v,
            Err(_) => panic!("waited {limit:?} in vain for {what}"),
        }
    })
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn the_async_echo_example_serves_many_flows_on_one_task_and_sees_them_closed() {
    let (a, b) = Daemon::pair("");
    let (flows, count) = (16usize, 50u64);
    let mb = b.app();
    let srv = mb.attach().unwrap();
    let server = std::thread::spawn(move || {
        let _m = mb;
        within(LIMIT, "the async echo server", async {
            let mut ch = AsyncChannel::new(srv).unwrap();
            ch.listen(IP_B, async_echo::PORT).await.unwrap();
            let (echoed, mut closed) = async_echo::serve(&mut ch, Some(flows as u64 * count)).await.unwrap();
            // The client closes its flows once it has every echo: the server hears of each.
            while closed < flows as u64 {
                let ev = ch.event().await.unwrap();
                if ev.kind == EventKind::FlowClosed {
                    closed += 1;
                }
            }
            (echoed, closed)
        })
    });
    let m = a.app();
    let rtts = within(LIMIT, "the async echo client", async {
        let mut ch = AsyncChannel::new(m.attach().unwrap()).unwrap();
        // The server task listens on its own time: a connect before that is refused; retry.
        let mut tries = 0;
        loop {
            match async_echo::ping(&mut ch, IP_A, IP_B, flows, count, 1000).await {
                Err(Error::Daemon(machnet::Status::Refused)) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                r => break r.expect("the client's flows"),
            }
        }
    });
    assert_eq!(rtts.len(), flows * count as usize, "every echo came back");
    let (echoed, closed) = server.join().unwrap();
    assert_eq!((echoed, closed), (flows as u64 * count, flows as u64));
}

#[test]
fn send_waits_for_transmit_buffers_instead_of_failing() {
    // 64 buffers a direction: a few 8000-byte messages (6 buffers each) fill the pool.
    let (a, b) = Daemon::pair(r#", "channel": {"buffers": 64}"#);
    let (n, size) = (300u64, 8000usize);
    let mb = b.app();
    let mut srv = mb.attach().unwrap();
    srv.listen(IP_B, 7200).unwrap();
    let server = std::thread::spawn(move || {
        let _m = mb;
        let mut buf = vec![0u8; size];
        for k in 0..n {
            let (len, _) = srv
                .recv_blocking(&mut buf, Some(Duration::from_secs(30)))
                .unwrap()
                .unwrap_or_else(|| panic!("message {k} of {n} did not arrive within 30 s"));
            assert_eq!(len, size);
            check(&buf[..len], 7, k);
        }
    });
    let m = a.app();
    let stats = within(LIMIT, "sending every message", async {
        let mut ch = AsyncChannel::new(m.attach().unwrap()).unwrap();
        let flow = ch.connect(IP_A, IP_B, 7200).await.unwrap();
        let mut msg = vec![0u8; size];
        for k in 0..n {
            fill(&mut msg, 7, k);
            ch.send(flow, &msg).await.unwrap();
        }
        // A message larger than the whole pool can never be sent: refused, not waited for.
        assert_eq!(ch.send(flow, &vec![1u8; 64 * 1500]).await, Err(Error::NoBuffers));
        ch.get_ref().stats()
    });
    server.join().unwrap();
    assert!(stats.tx_no_bufs > 0, "the sends never ran out of buffers, so nothing waited: {stats:?}");
    assert_eq!(stats.tx_msgs, n);
}

/// CPU time this thread has used (`/proc/thread-self/schedstat`, ns).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    Duration::from_nanos(s.split_whitespace().next().unwrap().parse().unwrap())
}

#[test]
fn a_closing_peer_is_an_event_a_dying_daemon_an_error_and_waiting_costs_no_cpu() {
    let (mut a, b) = Daemon::pair("");
    let mb = b.app();
    let mut srv = mb.attach().unwrap();
    srv.listen(IP_B, 7300).unwrap();
    // The server closes the flow after the first message.
    let server = std::thread::spawn(move || {
        let _m = mb;
        let mut buf = [0u8; 64];
        let (_, f) = srv.recv_blocking(&mut buf, Some(Duration::from_secs(30))).unwrap().expect("a message");
        srv.close(reverse(f)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let m = a.app();
    let rt = runtime();
    let mut ch = rt.block_on(async { AsyncChannel::new(m.attach().unwrap()).unwrap() });
    let flow = rt.block_on(ch.connect(IP_A, IP_B, 7300)).unwrap();
    rt.block_on(ch.send(flow, b"bye")).unwrap();
    let mut buf = [0u8; 64];
    let got = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), ch.recv_or_event(&mut buf)).await });
    match got {
        Ok(Ok(Incoming::Event(ev))) => {
            assert_eq!((ev.kind, ev.flow), (EventKind::FlowClosed, flow), "{ev:?}");
        }
        other => panic!("expected the peer's close as an event within 10 s, got {other:?}"),
    }
    server.join().unwrap();

    // Nothing comes: a receive waits on the doorbell, using (almost) no CPU.
    let before = thread_cpu();
    let r = rt.block_on(async { tokio::time::timeout(Duration::from_millis(500), ch.recv(&mut buf)).await });
    assert!(r.is_err(), "nothing to receive: {r:?}");
    let used = thread_cpu() - before;
    assert!(used < Duration::from_millis(150), "waiting 500 ms took {used:?} of CPU: the wait spins");

    // The daemon dies (SIGKILL: no goodbye on the channel) under a pending receive.
    let pending = rt.spawn(async move {
        let mut buf = [0u8; 64];
        let r = ch.recv(&mut buf).await;
        (r, ch)
    });
    std::thread::sleep(Duration::from_millis(100));
    a.kill();
    let (r, _ch) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), pending).await })
        .expect("the pending receive ended within 10 s of the daemon's death")
        .unwrap();
    assert_eq!(r.map(|_| ()), Err(Error::DaemonGone));
    drop(b);
}
