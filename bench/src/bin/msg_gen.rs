//! msg_gen: the request/response benchmark of the original Machnet, on the public client API.
//!
//! Server (no `--remote_ip`): listens on `--local_ip:--local_port` and answers every request
//! with a message of its own `--msg_size` whose first 8 bytes copy the request's (the window
//! slot). Client: connects to `--remote_ip:--remote_port`, keeps `--msg_window` requests
//! outstanding, records each round trip in an HDR histogram, and prints once per second
//!
//! `TX/RX (msg/sec, Gbps): (<tx>K/<rx>K, <txG>/<rxG>). RTT (p50/99/99.9 us): <p50>/<p99>/<p999>`
//!
//! and at exit (SIGINT, `--duration`, or `--msg_nr` responses)
//!
//! `Application Statistics (TOTAL) - [TX] Sent: <n> (<bytes> Bytes), Drops: <d>, [RX] Received: <m> (<bytes> Bytes)`
//!
//! Additions: `--msg_nr` is honoured, `--duration`, `--json` (one JSON object at exit with the
//! totals and whole-run percentiles), `--blocking` (sleep on the doorbell instead of spinning,
//! for machines with fewer cores than busy pollers), and `--embedded DEVICE`: no daemon, the
//! Machnet stack runs in this thread on its own port (`machnet_daemon::embedded`), a DPDK
//! device (vdev string or PCI address; needs the `dpdk` build) or `udp:BIND,PEER[,PEER...]`
//! (Ethernet frames in kernel UDP datagrams, like the daemon's udp backend). With
//! `--embedded`, the server exits once every client that connected has closed its flows.

use clap::Parser;
use machnet::client::{Channel, Error, Machnet};
use machnet::layout::MachnetFlow;
use machnet_bench::rpc::{self, RpcError, RpcIo, RpcOptions, StackDelta};
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "msg_gen", version, about = "Machnet request/response benchmark (the original's flags and output)")]
struct Args {
    /// Local IP (the local machnetd's address).
    #[arg(long = "local_ip")]
    local_ip: Ipv4Addr,
    /// Remote IP; empty (the default) runs the server.
    #[arg(long = "remote_ip", default_value = "")]
    remote_ip: String,
    /// Remote port.
    #[arg(long = "remote_port", default_value_t = 888)]
    remote_port: u16,
    /// Local port (the server listens on it).
    #[arg(long = "local_port", default_value_t = 888)]
    local_port: u16,
    /// Message size in bytes (> 8: the first 8 carry the window slot).
    #[arg(long = "msg_size", default_value_t = 64)]
    msg_size: usize,
    /// Requests kept outstanding (client).
    #[arg(long = "msg_window", default_value_t = 8)]
    msg_window: u64,
    /// Stop after this many responses (client) or requests (server).
    #[arg(long = "msg_nr", default_value_t = u64::MAX)]
    msg_nr: u64,
    /// Check every response's content.
    #[arg(long)]
    verify: bool,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Print one JSON object with the results at exit.
    #[arg(long)]
    json: bool,
    /// Fail (exit 1) when no response (client) or no request (server) arrives for this many
    /// seconds. Default: wait forever, as the original does.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Wait on the doorbell when idle instead of spinning.
    #[arg(long)]
    blocking: bool,
    /// Run the stack in this process on DEVICE instead of talking to machnetd: a DPDK vdev
    /// string or PCI address, or udp:BIND,PEER[,PEER...].
    #[arg(long, value_name = "DEVICE")]
    embedded: Option<String>,
    /// MAC of the embedded stack (default 02:00 followed by the local IP's four bytes).
    #[arg(long = "local_mac")]
    local_mac: Option<String>,
    /// Pin this thread to CPU N.
    #[arg(long)]
    cpu: Option<usize>,
    /// With --embedded: never carry ACKs in DATA (pure ACKs, as before they existed and as
    /// with an original peer); the same-run baseline of what they save.
    #[arg(long = "pure_acks")]
    pure_acks: bool,
    /// With --embedded: a constant congestion window of this many packets (the original's
    /// `Fixed` control) instead of Swift; for experiments such as S6's window study.
    #[arg(long = "fixed_window", value_parser = clap::value_parser!(u32).range(1..=4096))]
    fixed_window: Option<u32>,
    /// With --embedded: print each flow's window and RTTs and the stack's counters (transport,
    /// port, ARP) to stderr at exit, on both sides: where frames were dropped or retransmitted.
    #[arg(long = "stack_stats")]
    stack_stats: bool,
    /// With --embedded: answers batched while received messages wait, at most (0: all of
    /// them, until nothing is left to receive); for the same-run comparison of the bound.
    #[arg(long = "send_batch", default_value_t = 8)]
    send_batch: usize,
}

/// Listens (server) or connects (client) with `connect`, then runs the RPC loop; a client
/// reads its stack's counters (`counters`) before and after.
fn run_rpc<T: RpcIo<Peer = MachnetFlow>>(
    args: &Args,
    io: &mut T,
    remote: Option<Ipv4Addr>,
    opts: &RpcOptions,
    stop: &AtomicBool,
    connect: impl FnOnce(&mut T, Ipv4Addr, Ipv4Addr, u16) -> Result<MachnetFlow, Error>,
    counters: impl Fn(&T) -> Option<StackDelta>,
) -> Result<rpc::Totals, RpcError> {
    match remote {
        None => {
            eprintln!("msg_gen server: listening on {}:{}", args.local_ip, args.local_port);
            rpc::serve(io, opts, stop)
        }
        Some(ip) => {
            let flow = connect(io, args.local_ip, ip, args.remote_port).map_err(rpc_err)?;
            eprintln!("msg_gen client: connected {}:{} -> {ip}:{}", args.local_ip, flow.src_port, args.remote_port);
            let before = counters(io);
            let mut t = rpc::run_client(io, flow, opts, stop)?;
            if let (Some(b), Some(a)) = (before, counters(io)) {
                let d = StackDelta::between(&b, &a, t.rx_msgs);
                eprintln!(
                    "Stack: {:.2} frames per RPC ({} out, {} in, {} pure ACKs out), {} retransmitted, {} timeouts ({} spurious)",
                    d.frames_per_rpc, d.frames_out, d.frames_in, d.acks_out, d.retransmits, d.rto_fired, d.spurious_rto
                );
                t.stack = Some(d);
            }
            Ok(t)
        }
    }
}

/// A snapshot of transport counters, as [`StackDelta`] holds them.
fn snapshot(e: &machnet_transport::EndpointStats) -> StackDelta {
    StackDelta {
        frames_out: e.tx_data + e.tx_retransmits + e.tx_acks + e.tx_rsts,
        frames_in: e.rx_packets,
        acks_out: e.tx_acks,
        retransmits: e.tx_retransmits,
        rto_fired: e.rto_fired,
        spurious_rto: e.spurious_rto,
        frames_per_rpc: 0.0,
    }
}

/// The local daemon's transport counters (all its shards), from its statistics document.
fn daemon_counters() -> Option<StackDelta> {
    let mut c = machnet::ctrl::CtrlClient::connect(&machnet::ctrl::socket_path(), Duration::from_secs(2)).ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&c.stats(0).ok()?).ok()?;
    let mut sum = StackDelta::default();
    for sh in doc["shards"].as_array()? {
        let e = &sh["endpoint"];
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        sum.frames_out += n("tx_data") + n("tx_retransmits") + n("tx_acks") + n("tx_rsts");
        sum.frames_in += n("rx_packets");
        sum.acks_out += n("tx_acks");
        sum.retransmits += n("tx_retransmits");
        sum.rto_fired += n("rto_fired");
        sum.spurious_rto += n("spurious_rto");
    }
    Some(sum)
}

/// The client library as the RPC loop's transport.
struct Io<'a> {
    ch: &'a mut Channel,
    blocking: bool,
}

fn reverse(f: MachnetFlow) -> MachnetFlow {
    MachnetFlow { src_ip: f.dst_ip, dst_ip: f.src_ip, src_port: f.dst_port, dst_port: f.src_port }
}

fn rpc_err(e: Error) -> RpcError {
    RpcError(e.to_string())
}

impl RpcIo for Io<'_> {
    type Peer = MachnetFlow;

    fn send(&mut self, to: MachnetFlow, msg: &[u8]) -> Result<bool, RpcError> {
        match self.ch.send(to, msg) {
            Ok(()) => Ok(true),
            Err(Error::RingFull) | Err(Error::NoBuffers) => Ok(false),
            Err(e) => Err(rpc_err(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, RpcError> {
        let r = if self.blocking {
            self.ch.recv_blocking(buf, Some(Duration::from_millis(100)))
        } else {
            self.ch.recv(buf)
        };
        // Answers go back on the flow a request came in on, seen from this side.
        r.map(|m| m.map(|(n, flow)| (n, reverse(flow)))).map_err(rpc_err)
    }
}

fn main() {
    let args = Args::parse();
    if args.msg_size <= 8 {
        eprintln!("msg_gen: --msg_size must be greater than 8");
        std::process::exit(2);
    }
    let remote = if args.remote_ip.is_empty() {
        None
    } else {
        match args.remote_ip.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                eprintln!("msg_gen: --remote_ip {:?} is not an IPv4 address", args.remote_ip);
                std::process::exit(2);
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let opts = RpcOptions {
        msg_size: args.msg_size,
        window: args.msg_window,
        msg_nr: args.msg_nr,
        verify: args.verify,
        duration: args.duration.map(Duration::from_secs_f64),
        lines_to_stderr: args.json,
        timeout: args.timeout.map(Duration::from_secs_f64),
    };
    if let Some(cpu) = args.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            eprintln!("msg_gen: cannot pin to CPU {cpu}");
            std::process::exit(2);
        }
    }
    let result = match &args.embedded {
        Some(device) => embedded::run(&args, device, remote, &opts, &stop),
        None => (|| -> Result<rpc::Totals, RpcError> {
            let machnet = Machnet::init().map_err(rpc_err)?;
            let mut ch = machnet.attach().map_err(rpc_err)?;
            if remote.is_none() {
                ch.listen(args.local_ip, args.local_port).map_err(rpc_err)?;
            }
            let mut io = Io { ch: &mut ch, blocking: args.blocking };
            let t = run_rpc(
                &args,
                &mut io,
                remote,
                &opts,
                &stop,
                |io, l, r, p| io.ch.connect(l, r, p),
                |_| daemon_counters(),
            )?;
            // Let the last replies leave before the channel goes.
            std::thread::sleep(Duration::from_millis(20));
            Ok(t)
        })(),
    };
    match result {
        Ok(t) => {
            println!("{}", rpc::totals_line(&t));
            if args.json {
                println!("{}", serde_json::to_string(&t).expect("serialisable"));
            }
        }
        Err(e) => {
            eprintln!("msg_gen: {e}");
            std::process::exit(1);
        }
    }
}

mod embedded {
    //! `--embedded`: the stack in this thread.

    use super::*;
    use machnet_daemon::embedded::{Embedded, EmbeddedConfig};
    use machnet_net::port::udp::{UdpConfig, UdpPeer, UdpPort};
    use machnet_net::port::Port;
    use machnet_net::wire::EthernetAddress;

    struct EmbIo<P: Port> {
        stack: Embedded<P>,
        /// The server saw a connection, and every flow has closed since.
        accepted: bool,
    }

    impl<P: Port> RpcIo for EmbIo<P> {
        type Peer = MachnetFlow;

        fn send(&mut self, to: MachnetFlow, msg: &[u8]) -> Result<bool, RpcError> {
            match self.stack.send(to, msg) {
                Ok(()) => Ok(true),
                Err(Error::NoBuffers) => {
                    self.stack.poll();
                    Ok(false)
                }
                Err(e) => Err(rpc_err(e)),
            }
        }

        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, RpcError> {
            let r = self.stack.recv(buf).map_err(rpc_err)?;
            self.accepted |= r.is_some();
            Ok(r.map(|(n, flow)| (n, reverse(flow))))
        }

        fn peer_gone(&self) -> bool {
            self.accepted && self.stack.flow_count() == 0
        }
    }

    fn mac_for(args: &Args) -> Result<EthernetAddress, RpcError> {
        match &args.local_mac {
            Some(m) => m.parse().map_err(|e| RpcError(format!("--local_mac {m:?}: {e}"))),
            None => {
                let o = args.local_ip.octets();
                Ok(EthernetAddress([0x02, 0x00, o[0], o[1], o[2], o[3]]))
            }
        }
    }

    fn go<P: Port>(
        args: &Args,
        port: P,
        remote: Option<Ipv4Addr>,
        opts: &RpcOptions,
        stop: &AtomicBool,
    ) -> Result<rpc::Totals, RpcError> {
        let mut cfg = EmbeddedConfig::new(args.local_ip);
        cfg.transport.piggyback_acks = !args.pure_acks;
        cfg.send_batch = args.send_batch;
        if let Some(window) = args.fixed_window {
            cfg.transport.cc = machnet_transport::cc::CcConfig::Fixed { window };
        }
        let stack = Embedded::new(port, cfg).map_err(RpcError)?;
        let mut io = EmbIo { stack, accepted: false };
        if remote.is_none() {
            io.stack.listen(args.local_ip, args.local_port).map_err(rpc_err)?;
        }
        let t = run_rpc(
            args,
            &mut io,
            remote,
            opts,
            stop,
            |io, l, r, p| io.stack.connect(l, r, p),
            |io| Some(snapshot(io.stack.endpoint_stats())),
        )?;
        // Let the last replies leave, then close (dropping the stack resets its flows).
        let until = std::time::Instant::now() + Duration::from_millis(20);
        while std::time::Instant::now() < until {
            io.stack.poll();
        }
        if args.stack_stats {
            for f in io.stack.flows() {
                eprintln!(
                    "Stack flow {}: cwnd {:.1} packets, srtt {:?}, min RTT {:?}, {} in flight",
                    f.tuple, f.cwnd, f.srtt, f.min_rtt, f.in_flight
                );
            }
            eprintln!("Stack counters: {:?}", io.stack.endpoint_stats());
            eprintln!("Stack port and ARP: {:?}", io.stack.stats());
        }
        Ok(t)
    }

    pub(super) fn run(
        args: &Args,
        device: &str,
        remote: Option<Ipv4Addr>,
        opts: &RpcOptions,
        stop: &AtomicBool,
    ) -> Result<rpc::Totals, RpcError> {
        let mac = mac_for(args)?;
        if let Some(spec) = device.strip_prefix("udp:") {
            let mut addrs = spec.split(',').map(|a| a.trim().parse::<std::net::SocketAddrV4>());
            let bind = addrs
                .next()
                .and_then(|a| a.ok())
                .ok_or_else(|| RpcError(format!("--embedded udp:{spec}: expected udp:BIND,PEER[,PEER...]")))?;
            let peers = addrs
                .map(|a| a.map(UdpPeer::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RpcError(format!("--embedded udp:{spec}: {e}")))?;
            let port = UdpPort::new(&UdpConfig::new(bind, mac, peers))
                .map_err(|e| RpcError(format!("cannot bind {bind}: {e}")))?;
            return go(args, port, remote, opts, stop);
        }
        dpdk(args, device, mac, remote, opts, stop)
    }

    #[cfg(feature = "dpdk")]
    fn dpdk(
        args: &Args,
        device: &str,
        mac: EthernetAddress,
        remote: Option<Ipv4Addr>,
        opts: &RpcOptions,
        stop: &AtomicBool,
    ) -> Result<rpc::Totals, RpcError> {
        use machnet_daemon::dpdk_backend::DpdkBackend;
        let (backend, mut ports) =
            DpdkBackend::open_device(device, &Default::default(), 1, mac, None).map_err(RpcError)?;
        let port = ports.pop().expect("one queue");
        let r = go(args, port, remote, opts, stop);
        backend.close();
        r
    }

    #[cfg(not(feature = "dpdk"))]
    fn dpdk(
        _args: &Args,
        device: &str,
        _mac: EthernetAddress,
        _remote: Option<Ipv4Addr>,
        _opts: &RpcOptions,
        _stop: &AtomicBool,
    ) -> Result<rpc::Totals, RpcError> {
        Err(RpcError(format!(
            "--embedded {device:?}: this msg_gen is built without DPDK (build with --features dpdk), and the device is not udp:BIND,PEER"
        )))
    }
}
