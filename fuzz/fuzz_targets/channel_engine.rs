//! The engine side of a channel while a hostile application rewrites the shared region
//! (indices, descriptors, buffer headers, chains, counters, anything) between engine calls.
//!
//! Checks: no panic, no out-of-bounds access (ASan), buffer accounting always adds up to the
//! pool sizes, what the engine accepted stays consistent (chains of `count` buffers, every
//! segment ≤ mss, lengths summing to the total) however the region changes afterwards, and a
//! second channel served by the same engine code keeps working (only the victim is affected).
#![no_main]

use std::os::fd::AsFd;

use libfuzzer_sys::fuzz_target;
use machnet::client::Channel;
use machnet::engine::{EngineChannel, EngineStats, TxMsg};
use machnet::layout::{ChannelConfig, CtrlEntry, MachnetFlow, MsgDesc, Part};
use machnet::ops::{Event, EventKind, Status};
use machnet::testing::RawView;

const CFG: ChannelConfig = ChannelConfig { mss: 64, tx_bufs: 16, rx_bufs: 16, tx_ring: 8, rx_ring: 8, ctrl_ring: 16 };
const FLOW: MachnetFlow = MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 };

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let mut v = [0u8; 4];
        for b in &mut v {
            *b = self.u8()?;
        }
        Some(u32::from_le_bytes(v))
    }
    /// Small numbers most of the time (valid-looking indices and lengths), anything sometimes.
    fn num(&mut self) -> Option<u32> {
        let sel = self.u8()?;
        Some(match sel % 4 {
            0 => u32::from(sel >> 2),
            1 => u32::from(self.u8()?) * 8,
            2 => u32::MAX - u32::from(sel >> 2),
            _ => self.u32()?,
        })
    }
}

fn check_accounting(s: &EngineStats) {
    assert_eq!(s.tx_app + s.tx_engine + s.tx_returning + s.tx_reclaimed, s.tx_bufs, "{s:?}");
    assert_eq!(s.rx_free + s.rx_engine + s.rx_app, s.rx_bufs, "{s:?}");
}

/// What the engine accepted must be self-consistent, whatever the region says now.
fn check_msg(e: &EngineChannel, m: &TxMsg) {
    let mut buf = [0u8; 64];
    let (mut idx, mut n, mut sum) = (Some(m.head), 0u32, 0usize);
    while let Some(i) = idx {
        let l = e.seg_len(i);
        assert!(l >= 1 && l <= 64);
        assert_eq!(e.read_seg(i, &mut buf), l);
        sum += l;
        n += 1;
        assert!(n <= m.count);
        idx = e.seg_next(i);
    }
    assert_eq!((n, sum), (m.count, m.len as usize));
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let (mut victim, vfds) = EngineChannel::create(&CFG, "fuzz-victim", false).unwrap();
    let (mut other, ofds) = EngineChannel::create(&CFG, "fuzz-other", false).unwrap();
    let raw = RawView::map(vfds.memfd.as_fd(), *victim.layout()).unwrap();
    let mut other_app = Channel::from_fds(ofds).unwrap();
    let lay = *victim.layout();
    let mut held: Vec<TxMsg> = Vec::new();
    let mut rx_held: Vec<(u32, u32)> = Vec::new();
    while let Some(op) = inp.u8() {
        match op % 16 {
            // Any aligned word anywhere in the region.
            0 | 1 => {
                let (Some(off), Some(v)) = (inp.num(), inp.num()) else { break };
                raw.write_u32((off as usize * 4) % raw.len(), v);
            }
            // A word in the rings/headers area (where it hurts most).
            2 => {
                let (Some(off), Some(v)) = (inp.num(), inp.num()) else { break };
                let area = lay.offset(Part::TxPool);
                raw.write_u32((off as usize * 4) % area, v);
            }
            3 => {
                let (Some(head), Some(count), Some(len), Some(flags)) = (inp.num(), inp.num(), inp.num(), inp.num())
                else {
                    break;
                };
                raw.push_tx(MsgDesc { flow: FLOW, head, count, len, flags, reserved: 0 });
            }
            4 => {
                let (Some(idx), Some(next), Some(len)) = (inp.num(), inp.num(), inp.num()) else { break };
                raw.set_buf(Part::TxPool, idx % 20, next, len);
            }
            5 => {
                let Some(idx) = inp.num() else { break };
                raw.push_rx_return(idx);
            }
            6 => {
                let (Some(id), Some(op), Some(a)) = (inp.num(), inp.num(), inp.num()) else { break };
                raw.push_sq(CtrlEntry {
                    id: u64::from(id),
                    op: op % 5,
                    status: 0,
                    flow: MachnetFlow { src_ip: a, ..FLOW },
                    aux: 0,
                });
            }
            7 => {
                for _ in 0..4 {
                    match victim.poll_tx() {
                        Some(Ok(m)) => {
                            check_msg(&victim, &m);
                            if m.len % 3 == 0 {
                                victim.refuse_tx(&m, Status::NoSuchFlow);
                            } else {
                                held.push(m);
                            }
                        }
                        Some(Err(_)) => {}
                        None => break,
                    }
                }
            }
            8 => {
                // The region changed since acceptance: the private view must not have.
                for m in &held {
                    check_msg(&victim, m);
                }
                if let Some(m) = held.pop() {
                    victim.free_tx_chain(m.head);
                }
            }
            9 => {
                while let Some(r) = victim.poll_ctrl() {
                    if let Ok(r) = r {
                        let _ = victim.complete(r.id, Err(Status::NoSuchFlow));
                    }
                }
            }
            10 => {
                let Some(n) = inp.u8() else { break };
                let payload = [0x5Au8; 64];
                let len = usize::from(n % 65);
                if let Some(b) = victim.alloc_rx(&payload[..len]) {
                    rx_held.push((b, len as u32));
                }
            }
            11 => {
                // Deliver what was allocated as one chain (linked in allocation order).
                if !rx_held.is_empty() {
                    for w in rx_held.windows(2) {
                        assert!(victim.link_rx(w[0].0, w[1].0));
                    }
                    let total: u32 = rx_held.iter().map(|b| b.1).sum();
                    if victim.deliver(FLOW, rx_held[0].0, rx_held.len() as u32, total).is_ok() {
                        assert!(total > 0, "an empty message was delivered");
                        rx_held.clear();
                    } else {
                        for (b, _) in rx_held.drain(..) {
                            assert!(victim.free_rx(b));
                        }
                    }
                }
            }
            12 => victim.flush(),
            13 => {
                victim.post_event(Event { kind: EventKind::FlowFailed, flow: FLOW, status: Status::TimedOut, aux: 0 })
            }
            14 => {
                let _ = victim.rx_available();
            }
            _ => {
                let s = victim.stats();
                check_accounting(&s);
            }
        }
    }
    check_accounting(&victim.stats());
    for m in &held {
        check_msg(&victim, m);
    }
    // App death: everything comes back.
    let r = victim.reclaim_all();
    assert_eq!(r.tx_app + r.tx_engine, CFG.tx_bufs);
    assert_eq!(r.rx_app + r.rx_engine, CFG.rx_bufs);
    let s = victim.stats();
    assert_eq!((s.tx_reclaimed, s.rx_free), (CFG.tx_bufs, CFG.rx_bufs));
    // The other channel was not affected.
    other_app.send(FLOW, b"still fine").unwrap();
    let m = other.poll_tx().unwrap().unwrap();
    assert_eq!(m.len, 10);
    other.free_tx_chain(m.head);
    let b = other.alloc_rx(b"reply").unwrap();
    other.deliver(FLOW, b, 1, 5).unwrap();
    other.flush();
    let mut buf = [0u8; 16];
    assert_eq!(other_app.recv(&mut buf).unwrap(), Some((5, FLOW)));
    assert_eq!(other.stats().violations_total(), 0);
});
