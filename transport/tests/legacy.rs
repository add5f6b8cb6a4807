//! Exchanges with a scripted peer that behaves as an original Machnet does (spec §5–§8): ISN 0,
//! DATA with ackno 0xFFFFFFFF and timestamp 0, ACKs with timestamp 0 and SACK words in its
//! broken layout, one ACK per DATA packet, a 64-packet reassembly window.

mod sim;

use machnet_net::time::Instant;
use machnet_net::wire::{EthernetAddress, FrameRepr, MachnetRepr, MsgFlags, PacketType, SackBitmap};
use machnet_transport::cc::CcConfig;
use machnet_transport::{
    Config, Endpoint, Env, Event, FlowId, FlowTuple, InMsg, LocalAddr, LocalPorts, OutMsg, Owner, Seg,
};
use sim::{SegStore, IP_A, IP_B, MAC_A, MAC_B, OWNER, RX, SEG_SIZE, TX};
use std::time::Duration;

/// An environment that records every frame the endpoint sends.
struct Script {
    segs: SegStore,
    sent: Vec<(FrameRepr, Vec<u8>)>,
    timer: Option<(FlowId, Instant)>,
    events: Vec<Event>,
    delivered: Vec<Vec<u8>>,
}

impl Env for Script {
    fn alloc_rx(&mut self, _o: Owner, payload: &[u8], flags: MsgFlags) -> Option<Seg> {
        let s = self.segs.take(RX)?;
        let i = s as usize;
        self.segs.data_mut(i)[..payload.len()].copy_from_slice(payload);
        self.segs.set_meta(i, payload.len(), flags);
        Some(s)
    }
    fn link_rx(&mut self, _o: Owner, prev: Seg, next: Seg) {
        self.segs.set_next(prev, next);
    }
    fn free_rx(&mut self, _o: Owner, seg: Seg) {
        self.segs.put(seg, RX);
    }
    fn free_rx_chain(&mut self, _o: Owner, head: Seg, count: u32) {
        let mut s = head;
        for _ in 0..count {
            let n = self.segs.next_of(s);
            self.segs.put(s, RX);
            s = n;
        }
    }
    fn deliver(&mut self, o: Owner, _f: FlowId, _t: &FlowTuple, msg: &InMsg) -> bool {
        let mut bytes = Vec::new();
        let mut s = msg.head;
        for _ in 0..msg.count {
            bytes.extend_from_slice(self.segs.bytes(s));
            s = self.segs.next_of(s);
        }
        self.free_rx_chain(o, msg.head, msg.count);
        self.delivered.push(bytes);
        true
    }
    fn tx_meta(&self, _o: Owner, seg: Seg) -> (usize, MsgFlags) {
        self.segs.meta(seg)
    }
    fn tx_next(&self, _o: Owner, seg: Seg) -> Option<Seg> {
        let n = self.segs.next_of(seg);
        (n != Seg::MAX).then_some(n)
    }
    fn tx_link(&mut self, _o: Owner, prev: Seg, next: Seg) {
        self.segs.set_next(prev, next);
    }
    fn free_tx(&mut self, _o: Owner, seg: Seg) {
        self.segs.put(seg, TX);
    }
    fn transmit(&mut self, _o: Owner, frame: &FrameRepr, payload: Option<Seg>) -> bool {
        self.sent.push((*frame, payload.map(|s| self.segs.bytes(s).to_vec()).unwrap_or_default()));
        true
    }
    fn set_timer(&mut self, flow: FlowId, at: Option<Instant>) {
        self.timer = at.map(|t| (flow, t));
    }
    fn event(&mut self, _o: Owner, e: Event) {
        self.events.push(e);
    }
}

/// Our endpoint (B, 198.18.0.2) facing a scripted original peer (A, 198.18.0.1, port 40000).
struct Harness {
    ep: Endpoint,
    env: Script,
    now: Instant,
}

const PEER_PORT: u16 = 40_000;
const PORT: u16 = 888;

impl Harness {
    fn new(cfg: Config) -> Self {
        Harness {
            ep: Endpoint::new(cfg, LocalAddr { mac: MAC_B, ip: IP_B }, LocalPorts::new()).unwrap(),
            env: Script {
                segs: SegStore::new(4096, 4096),
                sent: Vec::new(),
                timer: None,
                events: Vec::new(),
                delivered: Vec::new(),
            },
            now: Instant::from_micros(10),
        }
    }

    /// Injects a packet from the original peer.
    fn inject(&mut self, hdr: MachnetRepr, payload: &[u8]) {
        let frame = machnet_net::wire::MachnetFrame {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src_ip: IP_A,
            dst_ip: IP_B,
            src_port: PEER_PORT,
            dst_port: PORT,
            hdr,
            payload,
        };
        self.ep.handle(self.now, &mut self.env, &frame);
        self.ep.flush(self.now, &mut self.env);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        if let Some((flow, at)) = self.env.timer {
            if at <= self.now {
                self.env.timer = None;
                self.ep.on_timer(self.now, &mut self.env, flow);
                self.ep.flush(self.now, &mut self.env);
            }
        }
    }

    fn take_sent(&mut self) -> Vec<(FrameRepr, Vec<u8>)> {
        std::mem::take(&mut self.env.sent)
    }

    /// The original's handshake as a client: SYN seq 0, then ACK(seq 1, ack = our ISN + 1).
    fn original_connects(&mut self) -> (u32, FlowId) {
        if self.ep.listener(PORT).is_none() {
            self.ep.listen(OWNER, PORT).unwrap();
        }
        self.inject(MachnetRepr::control(PacketType::Syn, 0, 0), &[]);
        let sent = self.take_sent();
        assert_eq!(sent.len(), 1);
        let synack = sent[0].0;
        assert_eq!(synack.hdr.packet_type, PacketType::SynAck);
        assert_eq!(synack.hdr.ackno, 1, "SYN-ACK acknowledges ISN 0 + 1");
        assert_eq!((synack.dst_mac, synack.dst_port, synack.src_port), (MAC_A, PEER_PORT, PORT));
        let our_isn = synack.hdr.seqno;
        self.inject(MachnetRepr::control(PacketType::Ack, 1, our_isn.wrapping_add(1)), &[]);
        let flow = match self.env.events.last() {
            Some(Event::Accepted { flow, .. }) => *flow,
            other => panic!("expected Accepted, got {other:?}"),
        };
        (our_isn, flow)
    }

    fn queue(&mut self, flow: FlowId, data: &[u8]) {
        let count = data.len().div_ceil(SEG_SIZE);
        let mut segs = Vec::new();
        for (i, chunk) in data.chunks(SEG_SIZE).enumerate() {
            let s = self.env.segs.take(TX).unwrap();
            self.env.segs.data_mut(s as usize)[..chunk.len()].copy_from_slice(chunk);
            self.env.segs.set_meta(s as usize, chunk.len(), MsgFlags::for_fragment(i, count));
            if let Some(&p) = segs.last() {
                self.env.segs.set_next(p, s);
            }
            segs.push(s);
        }
        let msg = OutMsg { head: segs[0], tail: *segs.last().unwrap(), count: count as u32, len: data.len() as u32 };
        self.ep.send(&mut self.env, flow, &msg).unwrap();
        self.ep.flush(self.now, &mut self.env);
    }
}

/// The original's ACK: seqno = its snd_nxt, ackno = its rcv_nxt, timestamp 0, and SACK words
/// written in its broken byte-bucket layout (word i/8, bit i%8), here with every word garbage.
fn original_ack(seqno: u32, ackno: u32, held: u16) -> MachnetRepr {
    MachnetRepr {
        sack: SackBitmap([0xFE, 0x1FE0_0000_0000_0000, u64::MAX, 0x00E0_0000_0000_0000]),
        sack_count: held,
        ..MachnetRepr::control(PacketType::Ack, seqno, ackno)
    }
}

#[test]
fn original_client_handshake_and_data_to_us() {
    let mut h = Harness::new(Config::default());
    let (_, flow) = h.original_connects();
    assert!(h.ep.flow_info(flow).unwrap().legacy_peer, "timestamp 0 in the SYN marks the peer as original");
    // Three messages, the second of three packets, exactly as the original sends them:
    // ackno 0xFFFFFFFF, timestamp 0, flags SYN|FIN, SYN|SG, SG, FIN.
    let m2: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let packets: Vec<(u32, MsgFlags, &[u8])> = vec![
        (1, MsgFlags::FIRST | MsgFlags::LAST, b"one"),
        (2, MsgFlags::FIRST | MsgFlags::MORE, &m2[..1418]),
        (3, MsgFlags::MORE, &m2[1418..2836]),
        (4, MsgFlags::LAST | MsgFlags::CHAIN, &m2[2836..]),
        (5, MsgFlags::FIRST | MsgFlags::LAST | MsgFlags::NOTIFY_DELIVERY, b"three"),
    ];
    for (seq, flags, payload) in &packets {
        h.inject(MachnetRepr { timestamp: 0, ..MachnetRepr::data(*seq, *flags, 0) }, payload);
        // One immediate ACK per DATA packet, cumulative, no SACK bits when in order.
        let sent = h.take_sent();
        assert_eq!(sent.len(), 1, "an ACK for DATA {seq}");
        let ack = sent[0].0.hdr;
        assert_eq!(ack.packet_type, PacketType::Ack);
        assert_eq!(ack.ackno, seq + 1);
        assert_eq!(ack.timestamp, 0, "echo of the original's zero timestamp");
        assert!(ack.sack.is_empty() && ack.sack_count == 0);
    }
    assert_eq!(h.env.delivered, vec![b"one".to_vec(), m2, b"three".to_vec()]);
}

#[test]
fn out_of_order_from_original_is_sacked_in_our_layout() {
    let mut h = Harness::new(Config::default());
    h.original_connects();
    // Packets 2, 3, 4 arrive before 1.
    for seq in [2u32, 3, 4] {
        h.inject(MachnetRepr::data(seq, MsgFlags::FIRST | MsgFlags::LAST, 0), b"x");
    }
    let last = h.take_sent().pop().unwrap().0.hdr;
    assert_eq!(last.ackno, 1);
    assert_eq!(last.sack_count, 3);
    // Distances 1, 2, 3 from ackno: bits 1..3 of the last word (the big-endian 256-bit layout
    // the original's sender reads).
    assert_eq!(last.sack.0, [0, 0, 0, 0b1110]);
    h.inject(MachnetRepr::data(1, MsgFlags::FIRST | MsgFlags::LAST, 0), b"x");
    let ack = h.take_sent().pop().unwrap().0.hdr;
    assert_eq!((ack.ackno, ack.sack_count), (5, 0));
    assert!(ack.sack.is_empty(), "no stale bits after the hole fills (the original's bug)");
    assert_eq!(h.env.delivered.len(), 4);
}

#[test]
fn our_data_to_original_receiver() {
    // Our window would allow 128 packets; an original holds at most 64 beyond its ackno.
    let mut h = Harness::new(Config { cc: CcConfig::Fixed { window: 128 }, ..Config::default() });
    let (isn, flow) = h.original_connects();
    let data: Vec<u8> = (0..200 * 1418u32).map(|i| (i * 7) as u8).collect();
    h.queue(flow, &data);
    let burst = h.take_sent();
    assert_eq!(burst.len(), 64, "at most 64 packets in flight to an original peer");
    for (i, (f, payload)) in burst.iter().enumerate() {
        let seq = isn.wrapping_add(1 + i as u32);
        assert_eq!(f.hdr.packet_type, PacketType::Data);
        assert_eq!(f.hdr.seqno, seq, "one sequence number per packet, from ISN + 1");
        assert_eq!(f.hdr.ackno, MachnetRepr::DATA_ACKNO);
        let want = MsgFlags::for_fragment(i, 200);
        assert_eq!(f.hdr.msg_flags, want);
        assert_eq!(payload.len(), 1418);
        assert_eq!(&payload[..], &data[i * 1418..(i + 1) * 1418]);
    }
    // The original acknowledges with timestamp 0 and garbage SACK words; the cumulative ackno
    // carries everything, the garbage must not stop the transfer, and we never run more than
    // 64 packets ahead of its ackno.
    let end = isn.wrapping_add(201);
    let mut highest = isn.wrapping_add(65);
    let mut rounds = 0;
    loop {
        h.advance(Duration::from_micros(20));
        let acked = highest;
        h.inject(original_ack(1, acked, 0), &[]);
        if acked == end {
            break;
        }
        for (f, _) in h.take_sent() {
            // New data only (a tail-loss probe may resend an older packet).
            if f.hdr.packet_type == PacketType::Data && (f.hdr.seqno.wrapping_sub(acked) as i32) >= 0 {
                assert!(
                    f.hdr.seqno.wrapping_sub(acked) < 64,
                    "seq {} beyond the original's window at ack {}",
                    f.hdr.seqno.wrapping_sub(isn),
                    acked.wrapping_sub(isn)
                );
                highest = highest.max(f.hdr.seqno.wrapping_add(1));
            }
        }
        rounds += 1;
        assert!(rounds < 100, "transfer stuck at {}", acked.wrapping_sub(isn));
    }
    // Everything acknowledged: all segments returned.
    assert_eq!(h.env.segs.tx_in_use, 0);
    let info = h.ep.flow_info(flow).unwrap();
    assert!(info.srtt > Duration::ZERO, "Karn samples from the original's zero-timestamp ACKs");
}

#[test]
fn original_lost_packet_is_recovered_by_dup_acks_and_sack_words_are_ignored() {
    let mut h = Harness::new(Config { cc: CcConfig::Fixed { window: 32 }, ..Config::default() });
    let (isn, flow) = h.original_connects();
    let data = vec![0xabu8; 10 * 1418];
    h.queue(flow, &data);
    let first = h.take_sent();
    assert_eq!(first.len(), 10);
    // Packet ISN+1 is lost: the original ACKs 2..10 with ackno = ISN+1 (duplicates), claiming
    // via its garbage SACK words that "everything" is held. (No time passes, so neither the
    // tail-loss probe nor the RTO plays a part.)
    for held in 1..=2u16 {
        h.inject(original_ack(1, isn.wrapping_add(1), held), &[]);
    }
    assert!(h.take_sent().is_empty(), "two duplicate ACKs are not yet a loss");
    h.inject(original_ack(1, isn.wrapping_add(1), 3), &[]);
    let retx: Vec<_> = h.take_sent().into_iter().filter(|(f, _)| f.hdr.packet_type == PacketType::Data).collect();
    assert_eq!(retx.len(), 1, "fast retransmit on the third duplicate ACK");
    assert_eq!(retx[0].0.hdr.seqno, isn.wrapping_add(1), "the hole is resent");
    // The garbage SACK words did not mark anything as received: an RTO resends the rest too.
    h.advance(Duration::from_millis(10));
    let after_rto: Vec<u32> = h
        .take_sent()
        .iter()
        .filter(|(f, _)| f.hdr.packet_type == PacketType::Data)
        .map(|(f, _)| f.hdr.seqno.wrapping_sub(isn))
        .collect();
    assert!(after_rto.contains(&1), "{after_rto:?}");
    h.inject(original_ack(1, isn.wrapping_add(11), 0), &[]);
    assert_eq!(h.env.segs.tx_in_use, 0);
}

#[test]
fn rst_from_original_closes_and_ours_carries_snd_nxt() {
    let mut h = Harness::new(Config::default());
    let (isn, flow) = h.original_connects();
    h.inject(MachnetRepr::data(1, MsgFlags::FIRST | MsgFlags::LAST, 0), b"hi");
    h.take_sent();
    // Our abort: RST with seqno = snd_nxt (ISN + 1, nothing sent), as the original expects.
    h.ep.abort(h.now, &mut h.env, flow).unwrap();
    let rst = h.take_sent().pop().unwrap().0.hdr;
    assert_eq!(rst.packet_type, PacketType::Rst);
    assert_eq!(rst.seqno, isn.wrapping_add(1));
    // A new connection; the original resets it with seqno = its snd_nxt = our rcv_nxt.
    let (_, flow) = h.original_connects();
    h.inject(MachnetRepr::control(PacketType::Rst, 1, 0), &[]);
    assert!(matches!(h.env.events.last(), Some(Event::PeerClosed { flow: f, .. }) if *f == flow));
    assert_eq!(h.ep.flow_count(), 0);
}

#[test]
fn we_connect_to_an_original_server() {
    let mut h = Harness::new(Config::default());
    let flow = h.ep.connect(h.now, &mut h.env, OWNER, IP_A, MAC_A, PEER_PORT, 9).unwrap();
    let syn = h.take_sent().pop().unwrap().0;
    assert_eq!(syn.hdr.packet_type, PacketType::Syn);
    assert_eq!(syn.dst_port, PEER_PORT);
    assert_eq!(syn.src_port, 1024, "lowest client port without RSS");
    // The original server answers with ISN 0 and ackno = our ISN + 1 …
    let frame = machnet_net::wire::MachnetFrame {
        src_mac: MAC_A,
        dst_mac: MAC_B,
        src_ip: IP_A,
        dst_ip: IP_B,
        src_port: PEER_PORT,
        dst_port: 1024,
        hdr: MachnetRepr::control(PacketType::SynAck, 0, syn.hdr.seqno.wrapping_add(1)),
        payload: &[],
    };
    h.ep.handle(h.now, &mut h.env, &frame);
    // … and accepts only an ACK with seqno = our snd_nxt, ackno = its ISN + 1.
    let ack = h.take_sent().pop().unwrap().0.hdr;
    assert_eq!(ack.packet_type, PacketType::Ack);
    assert_eq!((ack.seqno, ack.ackno), (syn.hdr.seqno.wrapping_add(1), 1));
    assert!(matches!(h.env.events.last(), Some(Event::Connected { token: 9, .. })));
    assert!(h.ep.flow_info(flow).unwrap().legacy_peer);
    let _ = EthernetAddress::ZERO;
}
