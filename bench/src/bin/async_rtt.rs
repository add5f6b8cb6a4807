//! async_rtt: what the asynchronous client (`machnet::asyncio`) adds to a round trip at
//! window 1, against the blocking client in the same run.
//!
//! Both clients talk to the same in-process test engine (`machnet::testing::TestEngine`: the
//! real channel, control socket and engine side, with an echo in place of the transport, its
//! shard idling adaptively on the doorbells), one message outstanding, alternating rounds of
//! the blocking client (`send` + `recv_blocking`) and the async one (`send().await` +
//! `recv().await` on a current-thread tokio runtime), so both see the same machine state.
//! The difference of the medians is the async path's added latency; the network and the
//! transport, which both paths share, are left out on purpose.
//!
//! `cargo run --release -p machnet-bench --bin async_rtt -- [--rounds R] [--count N] [--size BYTES]`

use machnet::asyncio::AsyncChannel;
use machnet::client::Machnet;
use machnet::testing::{TestEngine, TestEngineConfig};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ECHO: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Median and 99th percentile.
fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn main() {
    let (rounds, count, size) = (arg("--rounds", 5), arg("--count", 20_000), arg("--size", 64));
    let engine = TestEngine::start(TestEngineConfig::default()).expect("start the test engine");
    let m = Machnet::connect(engine.socket_path()).expect("register");
    let mut blocking = m.attach().expect("attach");
    let bflow = blocking.connect(LOCAL, ECHO, 7).expect("connect (blocking)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut asynch = rt.block_on(async { AsyncChannel::new(m.attach().expect("attach")) }).expect("async channel");
    let aflow = rt.block_on(asynch.connect(LOCAL, ECHO, 7)).expect("connect (async)");
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let (mut b_all, mut a_all) = (Vec::new(), Vec::new());
    println!("{size} B messages, window 1, {count} round trips per round, {rounds} rounds of each client");
    println!("round  blocking p50 us  p99 us   async p50 us  p99 us");
    for r in 0..rounds {
        let mut b = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            blocking.send(bflow, &msg).expect("send");
            blocking.recv_blocking(&mut buf, Some(Duration::from_secs(5))).expect("recv").expect("an echo within 5 s");
            b.push(t.elapsed());
        }
        let a = rt.block_on(async {
            let mut a = Vec::with_capacity(count);
            for _ in 0..count {
                let t = Instant::now();
                asynch.send(aflow, &msg).await.expect("send");
                tokio::time::timeout(Duration::from_secs(5), asynch.recv(&mut buf))
                    .await
                    .expect("an echo within 5 s")
                    .expect("recv");
                a.push(t.elapsed());
            }
            a
        });
        let ((b50, b99), (a50, a99)) = (summary(b.clone()), summary(a.clone()));
        println!("{r:>5}  {:>15.2}  {:>6.2}   {:>12.2}  {:>6.2}", us(b50), us(b99), us(a50), us(a99));
        b_all.extend(b);
        a_all.extend(a);
    }
    let ((b50, b99), (a50, a99)) = (summary(b_all), summary(a_all));
    println!("all    {:>15.2}  {:>6.2}   {:>12.2}  {:>6.2}", us(b50), us(b99), us(a50), us(a99));
    println!("async adds {:.2} us at the median, {:.2} us at p99", us(a50) - us(b50), us(a99) - us(b99));
}
