//! Steady-state send and receive allocate nothing, on either side of the channel.

use std::io::{IoSlice, IoSliceMut};

use machnet::client::Channel;
use machnet::engine::EngineChannel;
use machnet::layout::{ChannelConfig, MachnetFlow};
use machnet_net::testutil::{count_allocs, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const FLOW: MachnetFlow = MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 };

/// Engine side of one round: take every message, copy it into RX buffers segment by segment,
/// acknowledge (free) the TX buffers, deliver.
fn engine_round(e: &mut EngineChannel, scratch: &mut [u8]) -> usize {
    let mut n = 0;
    while let Some(m) = e.poll_tx() {
        let m = m.unwrap();
        let (mut head, mut prev, mut seg) = (0, None, Some(m.head));
        while let Some(i) = seg {
            let len = e.read_seg(i, scratch);
            let rx = e.alloc_rx(&scratch[..len]).unwrap();
            match prev {
                Some(p) => assert!(e.link_rx(p, rx)),
                None => head = rx,
            }
            prev = Some(rx);
            seg = e.seg_next(i);
        }
        e.free_tx_chain(m.head);
        e.deliver(m.flow.reversed(), head, m.count, m.len).unwrap();
        n += 1;
    }
    e.flush();
    n
}

#[test]
fn steady_state_send_and_receive_allocate_nothing() {
    let (mut e, fds) = EngineChannel::create(&ChannelConfig::DEFAULT, "alloc", false).unwrap();
    let mut app = Channel::from_fds(fds).unwrap();
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let mut scratch = vec![0u8; e.mss()];
    let mut out = vec![0u8; 8192];
    let mut round = |app: &mut Channel, e: &mut EngineChannel| {
        app.send(FLOW, &data[..64]).unwrap();
        app.sendmsg(FLOW, &[IoSlice::new(&data[..1000]), IoSlice::new(&data[1000..4321])], 0).unwrap();
        assert_eq!(engine_round(e, &mut scratch), 2);
        assert_eq!(app.recv(&mut out).unwrap().unwrap().0, 64);
        let (a, b) = out.split_at_mut(100);
        assert_eq!(app.recvmsg(&mut [IoSliceMut::new(a), IoSliceMut::new(b)]).unwrap().unwrap().0, 4321);
        assert!(app.recv(&mut out).unwrap().is_none());
    };
    // The counter is live: an allocation on this thread is seen.
    assert!(count_allocs(|| std::hint::black_box(Vec::<u8>::with_capacity(8))).0 > 0);
    for _ in 0..1000 {
        round(&mut app, &mut e);
    }
    let (allocs, ()) = count_allocs(|| {
        for _ in 0..20_000 {
            round(&mut app, &mut e);
        }
    });
    assert_eq!(allocs, 0, "the data path allocated");
    let s = e.stats();
    assert_eq!((s.tx_msgs, s.rx_msgs), (42_000, 42_000));
}
