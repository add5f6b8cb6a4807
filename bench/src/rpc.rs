//! The request/response loop shared by `msg_gen` and the kernel baselines, so that every
//! transport is measured by the same code: the same window handling, the same clock reads,
//! the same histogram, the same once-per-second line and the same totals.
//!
//! A request carries its window slot in its first 8 bytes; the server copies those 8 bytes
//! into its response; the client matches the response to the slot and records the round trip
//! from the moment it handed the request to the transport.

/// The largest message `kernel_rpc --proto udp` carries (one datagram each; the IPv4 limit is
/// 65,507 bytes of payload).
pub const KERNEL_UDP_MAX_MSG: usize = 65_000;

use hdrhistogram::Histogram;
use machnet_net::time::Instant;
use machnet_runtime::clock::Clock;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// An error from a transport, already described.
#[derive(Debug)]
pub struct RpcError(pub String);

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RpcError {}

impl From<std::io::Error> for RpcError {
    fn from(e: std::io::Error) -> Self {
        RpcError(e.to_string())
    }
}

/// A message transport as the RPC loop sees it.
pub trait RpcIo {
    /// Where a message came from / goes to.
    type Peer: Copy;
    /// Sends one whole message to `to`. `Ok(false)`: no room now, nothing consumed, try again.
    fn send(&mut self, to: Self::Peer, msg: &[u8]) -> Result<bool, RpcError>;
    /// Receives one whole message into `buf`: its length and the peer to answer. `Ok(None)`:
    /// nothing arrived (a blocking transport returns it after a bounded wait).
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Self::Peer)>, RpcError>;
    /// A server whose transport can tell that every client has gone stops serving.
    fn peer_gone(&self) -> bool {
        false
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RpcOptions {
    /// Message size, bytes (> 8).
    pub msg_size: usize,
    /// Requests kept outstanding (client).
    pub window: u64,
    /// Stop after this many responses (client) or requests (server).
    pub msg_nr: u64,
    /// Check every response's content.
    pub verify: bool,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Print the per-second lines to stderr instead of stdout (stdout then carries JSON).
    pub lines_to_stderr: bool,
    /// Fail when nothing arrives for this long: the client while requests are outstanding,
    /// the server while it waits for a request. `None` waits forever (the original's
    /// behaviour).
    pub timeout: Option<Duration>,
}

/// Results of one side of a run; `--json` prints this.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    /// "client" or "server".
    pub role: String,
    /// Message size.
    pub msg_size: usize,
    /// Window.
    pub msg_window: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Messages sent.
    pub tx_msgs: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Messages whose send the transport refused for lack of room (each counted once, as the
    /// original's msg_gen counts a failed send; ours retries it until it goes, so none is
    /// lost).
    pub tx_drops: u64,
    /// Refused send attempts (the retries of the messages in `tx_drops`).
    #[serde(default)]
    pub tx_refused: u64,
    /// Messages received.
    pub rx_msgs: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Responses per second (client).
    pub rps: f64,
    /// Round-trip percentiles over the whole run, µs (client).
    pub rtt_p50_us: f64,
    /// 99th percentile.
    pub rtt_p99_us: f64,
    /// 99.9th percentile.
    pub rtt_p999_us: f64,
    /// Largest.
    pub rtt_max_us: f64,
    /// Round trips recorded.
    pub rtt_samples: u64,
    /// What the local stack (the daemon, or the embedded stack) counted during the run, when
    /// the transport can tell (client only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackDelta>,
}

/// Transport counters of the local stack over a run: every frame of an RPC passes through the
/// client's stack (the request and its ACK out, the response and its ACK in), so frames per
/// RPC is `(frames_out + frames_in) / responses`. Other traffic on the same daemon counts too.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct StackDelta {
    /// Frames sent (DATA first sent and sent again, pure ACKs, RSTs).
    pub frames_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Pure ACKs sent.
    pub acks_out: u64,
    /// DATA frames sent again (timeouts, loss recovery, tail probes).
    pub retransmits: u64,
    /// Retransmission timeouts.
    pub rto_fired: u64,
    /// Timeouts found spurious (the ACK was late, not lost).
    pub spurious_rto: u64,
    /// `(frames_out + frames_in) / responses`.
    pub frames_per_rpc: f64,
}

impl StackDelta {
    /// The difference `after − before` of two snapshots (the same fields, as absolute
    /// counts), with frames per RPC for `responses`.
    pub fn between(before: &StackDelta, after: &StackDelta, responses: u64) -> StackDelta {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let mut x = StackDelta {
            frames_out: d(after.frames_out, before.frames_out),
            frames_in: d(after.frames_in, before.frames_in),
            acks_out: d(after.acks_out, before.acks_out),
            retransmits: d(after.retransmits, before.retransmits),
            rto_fired: d(after.rto_fired, before.rto_fired),
            spurious_rto: d(after.spurious_rto, before.spurious_rto),
            frames_per_rpc: 0.0,
        };
        if responses > 0 {
            x.frames_per_rpc = (x.frames_out + x.frames_in) as f64 / responses as f64;
        }
        x
    }
}

/// Byte `i` of every message (bytes 0..8 carry the slot).
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn fill(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate().skip(8) {
        *b = pattern_byte(i);
    }
}

/// When the run ends: `deadline` from `--duration`, checked against a clock reading the caller
/// already has (the loop reads the TSC clock once per turn; `clock_gettime` costs 25–35 ns
/// on this kind of VM, more than a small message's whole protocol processing).
fn finished(opts: &RpcOptions, now: Instant, deadline: Option<Instant>, stop: &AtomicBool, n: u64) -> bool {
    n >= opts.msg_nr || deadline.is_some_and(|d| now >= d) || stop.load(Ordering::Relaxed)
}

/// Answers requests until stopped: each response is `msg_size` bytes whose first 8 copy the
/// request's.
pub fn serve<T: RpcIo>(io: &mut T, opts: &RpcOptions, stop: &AtomicBool) -> Result<Totals, RpcError> {
    let mut inb = vec![0u8; (8 << 20).max(opts.msg_size)];
    let mut out = vec![0u8; opts.msg_size];
    fill(&mut out);
    let mut t = Totals { role: "server".into(), msg_size: opts.msg_size, ..Totals::default() };
    let mut clock = Clock::new();
    let start = clock.now();
    let deadline = opts.duration.map(|d| start + d);
    let mut turns = 0u32;
    let mut now = start;
    let mut last_rx = start;
    loop {
        // The deadline is checked every 16 turns (a clock read costs more than a message).
        turns = turns.wrapping_add(1);
        if turns % 16 == 0 {
            now = clock.now();
            if let Some(limit) = opts.timeout.filter(|&l| now - last_rx >= l) {
                return Err(RpcError(format!(
                    "no request for {:.1} s (--timeout) after {} requests",
                    limit.as_secs_f64(),
                    t.rx_msgs
                )));
            }
        }
        if finished(opts, now, deadline, stop, t.rx_msgs) || io.peer_gone() {
            break;
        }
        if let Some((n, peer)) = io.recv(&mut inb)? {
            if opts.timeout.is_some() {
                last_rx = clock.now();
            }
            t.rx_msgs += 1;
            t.rx_bytes += n as u64;
            out[..8.min(n)].copy_from_slice(&inb[..8.min(n)]);
            let mut refused = false;
            while !io.send(peer, &out)? {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                t.tx_refused += 1;
                if !refused {
                    refused = true;
                    t.tx_drops += 1;
                }
                std::hint::spin_loop();
            }
            t.tx_msgs += 1;
            t.tx_bytes += out.len() as u64;
        }
    }
    t.seconds = (clock.now() - start).as_secs_f64();
    Ok(t)
}

struct Second {
    hist: Histogram<u64>,
    tx: u64,
    rx: u64,
    txb: u64,
    rxb: u64,
    drops: u64,
    at: Instant,
}

/// The original's per-second line.
fn second_line(s: &Second, secs: f64) -> String {
    // Whole microseconds, as the original prints them.
    let pct = |q: f64| {
        if s.hist.is_empty() {
            "N/A".to_string()
        } else {
            s.hist.value_at_quantile(q).div_ceil(1000).to_string()
        }
    };
    let mut line = format!(
        "TX/RX (msg/sec, Gbps): ({:.1}K/{:.1}K, {:.3}/{:.3}). RTT (p50/99/99.9 us): {}/{}/{}",
        s.tx as f64 / secs / 1e3,
        s.rx as f64 / secs / 1e3,
        s.txb as f64 * 8.0 / secs / 1e9,
        s.rxb as f64 * 8.0 / secs / 1e9,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    if s.drops > 0 {
        line.push_str(&format!(", TX drops: {}", s.drops));
    }
    line
}

/// Counts a send of `len` bytes that went out (`sent`) or found no room; a message counts
/// as dropped at its first refusal only (`retry`: it was refused before). Returns `sent`.
fn count_send(sent: bool, retry: bool, len: usize, t: &mut Totals, sec: &mut Second) -> bool {
    if sent {
        t.tx_msgs += 1;
        t.tx_bytes += len as u64;
        sec.tx += 1;
        sec.txb += len as u64;
    } else {
        t.tx_refused += 1;
        if !retry {
            t.tx_drops += 1;
            sec.drops += 1;
        }
    }
    sent
}

/// Keeps `window` requests outstanding to `peer` until stopped, recording round trips.
pub fn run_client<T: RpcIo>(
    io: &mut T,
    peer: T::Peer,
    opts: &RpcOptions,
    stop: &AtomicBool,
) -> Result<Totals, RpcError> {
    let window = opts.window.max(1);
    let mut clock = Clock::new();
    let mut sent_at = vec![clock.now(); window as usize];
    let mut out = vec![0u8; opts.msg_size];
    fill(&mut out);
    let mut inb = vec![0u8; (8 << 20).max(opts.msg_size)];
    // Nanoseconds, 3 significant digits: sub-microsecond round trips stay visible.
    let hist = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds");
    let mut all = hist.clone();
    let mut sec = Second { hist, tx: 0, rx: 0, txb: 0, rxb: 0, drops: 0, at: clock.now() };
    let mut t = Totals { role: "client".into(), msg_size: opts.msg_size, msg_window: window, ..Totals::default() };
    // Slots whose send found no room, retried first on every turn (the original counted and
    // forgot them, shrinking its window).
    let mut pending: Vec<u64> = (0..window).collect();
    // Slots whose request was refused already (its retries count as attempts, not drops).
    let mut refused = vec![false; window as usize];
    let start = clock.now();
    let deadline = opts.duration.map(|d| start + d);
    sec.at = start;
    let mut handled = false;
    let mut now = start;
    let mut last_rx = start;
    let mut idle = 0u32;
    loop {
        // Slots without a request in flight: at start, and after a refused send.
        let mut i = 0;
        while i < pending.len() && t.tx_msgs < opts.msg_nr {
            let slot = pending[i];
            out[..8].copy_from_slice(&slot.to_ne_bytes());
            sent_at[slot as usize] = clock.now();
            let retry = refused[slot as usize];
            if count_send(io.send(peer, &out)?, retry, out.len(), &mut t, &mut sec) {
                refused[slot as usize] = false;
                pending.swap_remove(i);
            } else {
                refused[slot as usize] = true;
                i += 1;
            }
        }
        match io.recv(&mut inb)? {
            Some((n, _)) => {
                // One clock read per response: it ends this round trip and starts the slot's
                // next one (the request goes out right away, as in the original).
                now = clock.now();
                last_rx = now;
                idle = 0;
                let slot = u64::from_ne_bytes(inb[..8].try_into().expect("8 bytes"));
                if slot >= window || n < 8 {
                    return Err(RpcError(format!("response with slot {slot} of {n} bytes: not one of ours")));
                }
                let rtt = now.as_nanos().saturating_sub(sent_at[slot as usize].as_nanos()).max(1);
                let _ = sec.hist.record(rtt);
                let _ = all.record(rtt);
                if opts.verify {
                    if let Some((i, b)) = inb[8..n].iter().enumerate().find(|&(i, b)| *b != pattern_byte(i + 8)) {
                        return Err(RpcError(format!(
                            "response byte {} is {b:#x}, expected {:#x}",
                            i + 8,
                            pattern_byte(i + 8)
                        )));
                    }
                }
                t.rx_msgs += 1;
                t.rx_bytes += n as u64;
                sec.rx += 1;
                sec.rxb += n as u64;
                handled = true;
                if t.tx_msgs < opts.msg_nr {
                    out[..8].copy_from_slice(&slot.to_ne_bytes());
                    sent_at[slot as usize] = now;
                    if !count_send(io.send(peer, &out)?, false, out.len(), &mut t, &mut sec) {
                        refused[slot as usize] = true;
                        pending.push(slot);
                    }
                }
            }
            None => {
                // Idle turns read the clock now and then (for the deadline and the report).
                idle += 1;
                if idle % 16 == 1 {
                    now = clock.now();
                    if let Some(limit) = opts.timeout.filter(|&l| now - last_rx >= l) {
                        return Err(RpcError(format!(
                            "no response for {:.1} s (--timeout): {} of {} requests answered",
                            limit.as_secs_f64(),
                            t.rx_msgs,
                            t.tx_msgs
                        )));
                    }
                }
            }
        }
        if finished(opts, now, deadline, stop, t.rx_msgs) {
            break;
        }
        if handled && now - sec.at >= Duration::from_secs(1) {
            let line = second_line(&sec, (now - sec.at).as_secs_f64());
            if opts.lines_to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            sec.hist.reset();
            (sec.tx, sec.rx, sec.txb, sec.rxb, sec.drops) = (0, 0, 0, 0, 0);
            sec.at = now;
            handled = false;
        }
    }
    t.seconds = (clock.now() - start).as_secs_f64();
    t.rps = t.rx_msgs as f64 / t.seconds;
    if !all.is_empty() {
        t.rtt_p50_us = all.value_at_quantile(0.5) as f64 / 1e3;
        t.rtt_p99_us = all.value_at_quantile(0.99) as f64 / 1e3;
        t.rtt_p999_us = all.value_at_quantile(0.999) as f64 / 1e3;
        t.rtt_max_us = all.max() as f64 / 1e3;
        t.rtt_samples = all.len();
    }
    Ok(t)
}

/// The original's totals line.
pub fn totals_line(t: &Totals) -> String {
    format!(
        "Application Statistics (TOTAL) - [TX] Sent: {} ({} Bytes), Drops: {}, [RX] Received: {} ({} Bytes)",
        t.tx_msgs, t.tx_bytes, t.tx_drops, t.rx_msgs, t.rx_bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers every request at once, after refusing each message `refusals` times (a
    /// message is known by its window slot, the first 8 bytes).
    struct Echo {
        queue: VecDeque<Vec<u8>>,
        refusals: u32,
        tries: std::collections::HashMap<u64, u32>,
    }

    impl Echo {
        fn new(queue: VecDeque<Vec<u8>>, refusals: u32) -> Self {
            Echo { queue, refusals, tries: Default::default() }
        }
    }

    impl RpcIo for Echo {
        type Peer = ();
        fn send(&mut self, _to: (), msg: &[u8]) -> Result<bool, RpcError> {
            let slot = u64::from_ne_bytes(msg[..8].try_into().unwrap());
            let tries = self.tries.entry(slot).or_default();
            if *tries < self.refusals {
                *tries += 1;
                return Ok(false);
            }
            *tries = 0;
            self.queue.push_back(msg.to_vec());
            Ok(true)
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, ())>, RpcError> {
            Ok(self.queue.pop_front().map(|m| {
                buf[..m.len()].copy_from_slice(&m);
                (m.len(), ())
            }))
        }
    }

    fn opts(n: u64) -> RpcOptions {
        RpcOptions {
            msg_size: 64,
            window: 4,
            msg_nr: n,
            verify: true,
            duration: None,
            lines_to_stderr: true,
            timeout: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn a_refused_message_counts_as_one_drop_however_often_it_is_retried() {
        // As the original's msg_gen counts a failed send: once per message (it then forgot the
        // message; we retry it, and count the attempts apart).
        let mut io = Echo::new(VecDeque::new(), 3);
        let t = run_client(&mut io, (), &opts(100), &AtomicBool::new(false)).unwrap();
        assert_eq!((t.tx_msgs, t.rx_msgs), (100, 100));
        // Every message sent was refused first; up to a window more were refused when the run
        // ended (it needed no more) and never sent.
        assert!((100..=104).contains(&t.tx_drops), "{} drops", t.tx_drops);
        assert!(t.tx_refused >= 300 && t.tx_refused <= 3 * t.tx_drops, "{} refused", t.tx_refused);

        let mut io = Echo::new(VecDeque::new(), 0);
        let t = run_client(&mut io, (), &opts(100), &AtomicBool::new(false)).unwrap();
        assert_eq!((t.tx_drops, t.tx_refused), (0, 0));
    }

    #[test]
    fn the_server_counts_drops_the_same_way() {
        let mut io = Echo::new((0..50u64).map(|k| k.to_ne_bytes().repeat(8)).collect(), 2);
        // Its own responses land in the queue it reads: stop after 50 requests.
        let t = serve(&mut io, &opts(50), &AtomicBool::new(false)).unwrap();
        assert_eq!(t.rx_msgs, 50);
        assert_eq!(t.tx_drops, t.tx_msgs);
        assert_eq!(t.tx_refused, 2 * t.tx_msgs);
    }
}
