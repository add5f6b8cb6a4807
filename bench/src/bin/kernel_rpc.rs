//! kernel_rpc: the kernel baselines, measured by the same request/response loop as msg_gen
//! (`machnet_bench::rpc`): UDP ping-pong with blocking or busy-polling receive, and TCP
//! request/response over one connection with `TCP_NODELAY`.
//!
//! ```text
//! kernel_rpc --proto udp --listen 127.0.0.1:9000 &                     # server
//! kernel_rpc --proto udp --connect 127.0.0.1:9000 --msg_window 32 --duration 5
//! ```

use clap::{Parser, ValueEnum};
use machnet_bench::rpc::{self, RpcError, RpcIo, RpcOptions, KERNEL_UDP_MAX_MSG};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
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

/// Fixed-size messages over a byte stream: partial reads are kept until a message is whole,
/// and what the socket has no room for is kept and written as room opens, while reading, so
/// neither end ever blocks in a write: with a window of large messages (8 MiB x 8) both ends
/// would otherwise block writing more than the socket buffers hold, each waiting for the other
/// to read (the deadlock the earlier version had).
struct Tcp {
    stream: TcpStream,
    msg_size: usize,
    have: usize,
    /// Accepted bytes the socket had no room for yet, written before anything newer: a ring,
    /// so its size stays what is pending (at most a window of messages: each request gets one
    /// response) however long the socket stays full.
    out: VecDeque<u8>,
    /// How long a receive waits for data (`None`: busy-polling, never waits).
    wait: Option<Duration>,
}

impl Tcp {
    fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes as much of `bytes` as the socket takes now, without blocking; returns how much.
    fn write_some(&self, bytes: &[u8]) -> Result<usize, RpcError> {
        let mut off = 0;
        while off < bytes.len() {
            let rest = &bytes[off..];
            // SAFETY: send(2) reads `rest.len()` bytes from `rest`, a live borrowed slice, on
            // the stream's own descriptor; MSG_DONTWAIT makes it return instead of blocking
            // whatever the socket's mode, MSG_NOSIGNAL turns a closed peer into EPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                off += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock => break,
                ErrorKind::Interrupted => {}
                _ => return Err(e.into()),
            }
        }
        Ok(off)
    }

    /// Writes what is pending as far as the socket takes it now.
    fn flush(&mut self) -> Result<(), RpcError> {
        while self.pending() {
            let front = self.out.as_slices().0;
            let (len, n) = (front.len(), self.write_some(front)?);
            self.out.drain(..n);
            if n < len {
                break;
            }
        }
        Ok(())
    }

    /// Waits (up to `limit`) until the socket is readable or has room for pending bytes:
    /// `true` if it is readable.
    fn wait_readable_or_writable(&self, limit: Duration) -> Result<bool, RpcError> {
        let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN | libc::POLLOUT, revents: 0 };
        let ms = limit.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd we own, for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted { Ok(false) } else { Err(e.into()) };
        }
        Ok(fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
    }
}

impl RpcIo for Tcp {
    type Peer = ();

    fn send(&mut self, _to: (), msg: &[u8]) -> Result<bool, RpcError> {
        // Behind pending bytes, or what the socket does not take now: kept for later.
        let written = if self.pending() { 0 } else { self.write_some(msg)? };
        if written < msg.len() {
            self.out.extend(&msg[written..]);
            self.flush()?;
        }
        Ok(true)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, ())>, RpcError> {
        let start = std::time::Instant::now();
        while self.have < self.msg_size {
            self.flush()?;
            if self.pending() {
                if let Some(wait) = self.wait {
                    // Room for the pending bytes or data to read, whichever comes first: a
                    // read that blocked here could wait for a peer that is waiting for them.
                    let left = wait.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    if !self.wait_readable_or_writable(left)? {
                        continue;
                    }
                }
            }
            // Blocking (with the read timeout) only when nothing is pending, or when poll said
            // there is data; busy-polling, the socket is non-blocking.
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
            if args.msg_size > KERNEL_UDP_MAX_MSG {
                return Err(RpcError(format!("--msg_size above {KERNEL_UDP_MAX_MSG} does not fit a UDP datagram")));
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
            let mut io = Tcp { stream, msg_size: args.msg_size, have: 0, out: VecDeque::new(), wait: timeout };
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
