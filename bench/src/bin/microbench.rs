//! Wire and RSS microbenchmarks: parse+validate and emit of Machnet DATA and ACK frames, and
//! the Toeplitz source-port search, each next to a baseline measured in the same run.
//!
//! `cargo run --release -p machnet-bench --bin microbench [-- --runs N]`

use machnet_bench::{machine_summary, measure, table};
use machnet_net::rss::{search_source_port, toeplitz, PortBitmap, Rss, MICROSOFT_KEY};
use machnet_net::wire::{
    classify, ChecksumCaps, EthernetAddress, Frame, FrameRepr, MachnetRepr, MsgFlags, PacketType, SackBitmap,
};
use std::hint::black_box;
use std::net::Ipv4Addr;

fn data_repr() -> FrameRepr {
    FrameRepr {
        src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
        dst_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
        src_ip: Ipv4Addr::new(198, 18, 0, 1),
        dst_ip: Ipv4Addr::new(198, 18, 0, 2),
        src_port: 1024,
        dst_port: 888,
        hdr: MachnetRepr::data(42, MsgFlags::FIRST | MsgFlags::LAST, 123_456),
    }
}

fn ack_repr() -> FrameRepr {
    let mut sack = SackBitmap::new();
    sack.set(3);
    sack.set(70);
    FrameRepr {
        hdr: MachnetRepr { sack, sack_count: 2, ..MachnetRepr::control(PacketType::Ack, 9, 42) },
        ..data_repr()
    }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "microbench",
    version,
    about = "Wire parse/emit and RSS-- port search, each next to a baseline measured in the same run"
)]
struct Args {
    /// Runs per measurement (the median, min and max are reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

fn main() {
    let runs = <Args as clap::Parser>::parse().runs as usize;
    let sw = ChecksumCaps::software();
    let offload = ChecksumCaps::tx_only().without_rx();

    let mut data64 = vec![0u8; 2048];
    let n64 = data_repr().emit_with_payload(&mut data64, &[0x5a; 64], sw).unwrap();
    let mut data1k = vec![0u8; 2048];
    let n1k = data_repr().emit_with_payload(&mut data1k, &[0x5a; 1024], sw).unwrap();
    let mut data_full = vec![0u8; 2048];
    let nfull = data_repr().emit_with_payload(&mut data_full, &[0x5a; 1418], sw).unwrap();
    let mut ack = vec![0u8; 128];
    let nack = ack_repr().emit(&mut ack, 0, sw).unwrap();

    let parse = |buf: &[u8], caps| match classify(black_box(buf), caps) {
        Ok(Frame::Machnet(m)) => m.hdr.seqno as usize + m.payload.len(),
        _ => panic!("benchmark frame must classify"),
    };

    let mut copy_dst = [0u8; 96];
    let baseline = measure("baseline: copy 96 header bytes", 20_000_000, runs, |_| {
        copy_dst.copy_from_slice(black_box(&data64[..96]));
        copy_dst[10]
    });
    let mut out = vec![0u8; 2048];
    let wire = vec![
        measure("parse+validate DATA 64 B, rx checksums offloaded", 20_000_000, runs, |_| {
            parse(&data64[..n64], offload)
        }),
        measure("parse+validate DATA 1418 B, rx checksums offloaded", 20_000_000, runs, |_| {
            parse(&data_full[..nfull], offload)
        }),
        measure("parse+validate ACK, rx checksums offloaded", 20_000_000, runs, |_| parse(&ack[..nack], offload)),
        measure("parse+validate DATA 64 B, software checksums", 10_000_000, runs, |_| parse(&data64[..n64], sw)),
        measure("parse+validate DATA 1 KiB, software checksums", 5_000_000, runs, |_| parse(&data1k[..n1k], sw)),
        measure("parse+validate ACK, software checksums", 10_000_000, runs, |_| parse(&ack[..nack], sw)),
        measure("emit DATA headers 64 B, tx checksums offloaded", 20_000_000, runs, |_| {
            data_repr().emit(&mut out, 64, ChecksumCaps { ipv4: Default::default(), ..offload }).unwrap()
        }),
        measure("emit DATA headers 1 KiB, software checksums", 5_000_000, runs, |_| {
            data_repr().emit(&mut out, 1024, sw).unwrap()
        }),
        measure("emit ACK, software checksums", 10_000_000, runs, |_| ack_repr().emit(&mut out, 0, sw).unwrap()),
    ];

    // Port search: 4 queues, 128-entry round-robin RETA, empty bitmap; every (queue, remote
    // port) pair once per iteration slot.
    let rss = Rss::new(&MICROSOFT_KEY, &Rss::round_robin_reta(128, 4)).unwrap();
    let ports = PortBitmap::new();
    let local = Ipv4Addr::new(198, 18, 0, 1);
    let remote = Ipv4Addr::new(198, 18, 0, 2);
    let search = |i: u64| {
        search_source_port(Some(&rss), (i % 4) as u16, local, remote, 1000 + (i % 4096) as u16, &ports).unwrap()
    };
    // Baseline: the same search evaluating the bit-by-bit reference hash per candidate.
    let reference = |i: u64| {
        let (q, rp) = ((i % 4) as u16, 1000 + (i % 4096) as u16);
        (1024..=65535u16)
            .find(|&p| {
                let input = machnet_net::rss::ipv4_tuple_input(remote, local, rp, p);
                let h = toeplitz(&MICROSOFT_KEY, &input);
                rss.queue_of(h) == q && rss.queue_of(h.swap_bytes()) == q
            })
            .unwrap()
    };
    let rss_base = measure("baseline: port search with bit-by-bit Toeplitz", 200_000, runs, reference);
    let rss_samples = vec![
        measure("port search (table Toeplitz, 4 queues)", 2_000_000, runs, search),
        measure("Toeplitz hash of a 12-byte tuple (table)", 50_000_000, runs, |i| {
            rss.hash(&machnet_net::rss::ipv4_tuple_input(remote, local, 888, i as u16))
        }),
    ];

    println!("machine: {}", machine_summary());
    println!("runs per measurement: {runs}\n");
    println!("{}", table(&wire, &baseline));
    println!("{}", table(&rss_samples, &rss_base));
}
