//! kernel_rpc: the kernel baselines, measured by the same request/response loop as msg_gen
//! (`machnet_bench::rpc`): UDP ping-pong with blocking or busy-polling receive, and TCP
//! request/response over one connection with `TCP_NODELAY`.
//!
//! ```text
//! kernel_rpc --proto udp --listen 127.0.0.1:9000 &                     # server
//! kernel_rpc --proto udp --connect 127.0.0.1:9000 --msg_window 32 --duration 5
//! ```

use clap::{Parser, ValueEnum};
use machnet_bench::rpc::{self, RpcError, RpcIo, RpcOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Proto {
    /// One datagram per message.
    Udp,
    /// One connection, messages back to back, TCP_NODELAY.
    Tcp,
}

#[derive(Parser, Debug)]
#[command(name = "kernel_rpc", version, about = "Kernel UDP/TCP request/response baseline (msg_gen's loop and output)")]
struct Args {
    /// Transport.
    #[arg(long, value_enum, default_value = "udp")]
    proto: Proto,
    /// Serve on this address.
    #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
    listen: Option<SocketAddr>,
    /// Run the client against this server.
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// Message size in bytes (> 8; at most 65000 for UDP).
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
    /// Spin on non-blocking receives instead of sleeping in the kernel.
    #[arg(long = "busy_poll")]
    busy_poll: bool,
}

struct Udp {
    sock: UdpSocket,
}

impl RpcIo for Udp {
    type Peer = SocketAddr;

    fn send(&mut self, to: SocketAddr, msg: &[u8]) -> Result<bool, RpcError> {
        match self.sock.send_to(msg, to) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, SocketAddr)>, RpcError> {
        match self.sock.recv_from(buf) {
            Ok((n, from)) => Ok(Some((n, from))),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Fixed-size messages over a byte stream: partial reads are kept until a message is whole.
struct Tcp {
    stream: TcpStream,
    msg_size: usize,
    have: usize,
}

impl RpcIo for Tcp {
    type Peer = ();

    fn send(&mut self, _to: (), msg: &[u8]) -> Result<bool, RpcError> {
        // The whole message goes out before the call returns (a window of messages fits the
        // socket buffer, so this spins only in pathological cases).
        let mut off = 0;
        while off < msg.len() {
            match self.stream.write(&msg[off..]) {
                Ok(n) => off += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => std::hint::spin_loop(),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, ())>, RpcError> {
        while self.have < self.msg_size {
            match self.stream.read(&mut buf[self.have..self.msg_size]) {
                Ok(0) => return Err(RpcError("connection closed by the peer".into())),
                Ok(n) => self.have += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.have = 0;
        Ok(Some((self.msg_size, ())))
    }
}

fn run(args: &Args, stop: &AtomicBool) -> Result<rpc::Totals, RpcError> {
    let opts = RpcOptions {
        msg_size: args.msg_size,
        window: args.msg_window,
        msg_nr: args.msg_nr,
        verify: args.verify,
        duration: args.duration.map(Duration::from_secs_f64),
        lines_to_stderr: args.json,
        timeout: args.timeout.map(Duration::from_secs_f64),
    };
    // Blocking receives wake up every 100 ms to notice a stop.
    let timeout = (!args.busy_poll).then_some(Duration::from_millis(100));
    match args.proto {
        Proto::Udp => {
            if args.msg_size > 65000 {
                return Err(RpcError("--msg_size above 65000 does not fit a UDP datagram".into()));
            }
            let bind: SocketAddr = args.listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
            let sock = UdpSocket::bind(bind)?;
            let bound = sock.local_addr()?;
            sock.set_nonblocking(args.busy_poll)?;
            sock.set_read_timeout(timeout)?;
            let mut io = Udp { sock };
            match args.connect {
                Some(server) => rpc::run_client(&mut io, server, &opts, stop),
                None => {
                    eprintln!("kernel_rpc udp server: listening on {bound}");
                    rpc::serve(&mut io, &opts, stop)
                }
            }
        }
        Proto::Tcp => {
            let stream = match args.connect {
                Some(server) => TcpStream::connect(server)?,
                None => {
                    let l = TcpListener::bind(args.listen.expect("clap requires one"))?;
                    eprintln!("kernel_rpc tcp server: listening on {}", l.local_addr()?);
                    l.set_nonblocking(true)?;
                    let since = std::time::Instant::now();
                    loop {
                        match l.accept() {
                            Ok((s, _)) => break s,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                    return Ok(rpc::Totals { role: "server".into(), ..Default::default() });
                                }
                                if opts.timeout.is_some_and(|t| since.elapsed() >= t) {
                                    return Err(RpcError("no connection within --timeout".into()));
                                }
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            };
            stream.set_nodelay(true)?;
            stream.set_nonblocking(args.busy_poll)?;
            stream.set_read_timeout(timeout)?;
            let mut io = Tcp { stream, msg_size: args.msg_size, have: 0 };
            match args.connect {
                Some(_) => rpc::run_client(&mut io, (), &opts, stop),
                None => rpc::serve(&mut io, &opts, stop),
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.msg_size <= 8 {
        eprintln!("kernel_rpc: --msg_size must be greater than 8");
        std::process::exit(2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    match run(&args, &stop) {
        Ok(t) => {
            println!("{}", rpc::totals_line(&t));
            if args.json {
                println!("{}", serde_json::to_string(&t).expect("serialisable"));
            }
        }
        Err(e) => {
            eprintln!("kernel_rpc: {e}");
            std::process::exit(1);
        }
    }
}
