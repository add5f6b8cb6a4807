//! Ethernet frames tunnelled one per kernel UDP datagram: the zero-setup backend.
//!
//! Each daemon binds a UDP socket per receive queue and names its peers' socket addresses. The
//! port behaves like a learning switch port: a frame for a broadcast or multicast MAC goes to
//! every peer; a unicast frame goes to the peer whose MAC is configured or was learned from the
//! frames it sent, and to every peer while unknown. Datagrams from unknown senders, shorter than
//! an Ethernet header, or longer than a buffer are counted and dropped. Sockets are non-blocking
//! and I/O is batched with `recvmmsg`/`sendmmsg`. No privileges needed.
//!
//! **Queues and RSS.** A device of N queues ([`UdpPort::open_queues`]) binds N sockets, queue
//! *q* on the base port + *q*, and publishes an RSS key and redirection table in its
//! capabilities, as a NIC does. A peer with several queues is named with its key and table
//! ([`UdpPeer::rss`]): the sender plays the receiving NIC's part and puts each frame in the
//! datagram for the queue that NIC would pick, the Toeplitz hash of the inner IPv4/UDP 4-tuple
//! (the IPv4 pair for other IPv4 frames and fragments) through the table, and frames that are
//! not IPv4 (ARP) or not unicast on queue 0. So the receiver sees exactly what an RSS NIC would
//! give it. A peer's datagrams are recognised from any of its queues' ports.

use super::pool::{shared_spare, CachedPool, HeapBuf};
use super::{Burst, Capabilities, PacketBuf, Port, PortStats, RssInfo, BURST};
use crate::rss::{Rss, MICROSOFT_KEY};
use crate::wire::{ChecksumCaps, EthernetAddress};
use arrayvec::ArrayVec;
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

/// u64 words of control buffer per datagram: room for one `SCM_TIMESTAMPNS` message.
const CTRL_WORDS: usize = 8;

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a valid, exclusively borrowed value.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// `CLOCK_REALTIME − CLOCK_MONOTONIC`, in ns.
fn realtime_minus_monotonic() -> i64 {
    let m0 = clock_ns(libc::CLOCK_MONOTONIC);
    let r = clock_ns(libc::CLOCK_REALTIME);
    let m1 = clock_ns(libc::CLOCK_MONOTONIC);
    r - (m0 + (m1 - m0) / 2)
}

/// The `SCM_TIMESTAMPNS` of a received message, ns of CLOCK_REALTIME.
fn rx_realtime_ns(h: &libc::msghdr) -> Option<u64> {
    // SAFETY: `h` was filled by recvmmsg with `msg_control` pointing at a buffer of
    // `msg_controllen` bytes that outlives this call; the CMSG macros only walk inside it, and
    // the timespec is read unaligned from within the message's data.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_TIMESTAMPNS {
                let ts = core::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Most peers one port can name.
pub const MAX_PEERS: usize = 64;
/// Most datagrams one `sendmmsg` call carries (a broadcast frame takes one per peer).
const TX_BATCH: usize = 64;

/// Entries of the redirection table a multi-queue tunnel device uses unless told otherwise
/// (many NICs have 128), programmed round-robin over the queues as the original does.
pub const RETA_SIZE: usize = 128;

/// A tunnel peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPeer {
    /// The peer's tunnel socket address (its queue 0).
    pub addr: SocketAddrV4,
    /// The peer's MAC if known in advance (otherwise learned from its frames).
    pub mac: Option<EthernetAddress>,
    /// The peer's RSS key and redirection table, if it has several queues: its queue *q*
    /// listens on `addr`'s port + *q*, and frames go to the queue its table picks.
    pub rss: Option<RssInfo>,
}

impl UdpPeer {
    /// A single-queue peer at `addr`, its MAC learned.
    pub fn new(addr: SocketAddrV4) -> Self {
        UdpPeer { addr, mac: None, rss: None }
    }

    /// A peer of `queues` queues hashing with `key` through a round-robin table of
    /// [`RETA_SIZE`] entries (one queue: no RSS).
    pub fn with_queues(addr: SocketAddrV4, queues: u16, key: &[u8]) -> Self {
        UdpPeer { addr, mac: None, rss: default_rss(queues, key) }
    }
}

/// The RSS state of a tunnel device of `queues` queues with `key`: `None` for one queue.
pub fn default_rss(queues: u16, key: &[u8]) -> Option<RssInfo> {
    (queues > 1).then(|| RssInfo { key: key.to_vec(), reta: Rss::round_robin_reta(RETA_SIZE, queues) })
}

/// Queues an RSS table names (its largest entry + 1).
fn queues_of(rss: &RssInfo) -> u16 {
    rss.reta.iter().max().map_or(1, |m| m + 1)
}

/// The receive queue a NIC with `rss` picks for `frame`: the Toeplitz hash of the IPv4/UDP
/// 4-tuple (of the IPv4 addresses alone for other protocols and fragments) through the
/// redirection table; queue 0 for anything else. Reads a few header bytes; never allocates.
pub fn rss_queue(rss: &Rss, frame: &[u8]) -> u16 {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return 0;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return 0;
    }
    let mut input = [0u8; 12];
    input[..8].copy_from_slice(&ip[12..20]);
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ip[9] == 17 && !fragment && ip.len() >= ihl + 4 {
        input[8..].copy_from_slice(&ip[ihl..ihl + 4]);
    }
    rss.queue_of(rss.hash(&input))
}

/// Configuration of a [`UdpPort`].
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// Local tunnel socket address.
    pub bind: SocketAddrV4,
    /// Peers.
    pub peers: Vec<UdpPeer>,
    /// This port's MAC.
    pub mac: EthernetAddress,
    /// IP MTU (frames up to MTU + 14 bytes).
    pub mtu: usize,
    /// Packet buffers in the pool.
    pub buffers: usize,
    /// Requested kernel socket buffer size (both directions), bytes.
    pub socket_buffer: usize,
    /// With several queues ([`UdpPort::open_queues`]): the RSS key the peers hash this
    /// device's frames with (default: [`MICROSOFT_KEY`]); the table is round-robin over the
    /// queues, [`RETA_SIZE`] entries.
    pub rss_key: Vec<u8>,
}

impl UdpConfig {
    /// Defaults: MTU 1500, 4096 buffers, 16 MiB socket buffers (set with SO_RCVBUFFORCE where
    /// privileged, else capped by net.core.rmem_max/wmem_max).
    pub fn new(bind: SocketAddrV4, mac: EthernetAddress, peers: Vec<UdpPeer>) -> Self {
        UdpConfig {
            bind,
            peers,
            mac,
            mtu: 1500,
            buffers: 4096,
            socket_buffer: 16 << 20,
            rss_key: MICROSOFT_KEY.to_vec(),
        }
    }
}

/// Counters specific to the tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Datagrams shorter than an Ethernet header.
    pub rx_short: u64,
    /// Datagrams longer than a buffer.
    pub rx_oversize: u64,
    /// Datagrams from an address that is not a peer.
    pub rx_unknown_sender: u64,
    /// Frames dropped on a send error other than a full socket buffer.
    pub tx_errors: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddrV4,
    sa: libc::sockaddr_in,
    mac: Option<EthernetAddress>,
    /// Its receive queues (ports `addr.port()` ..) and the hash that picks one.
    queues: u16,
    rss: Option<Rss>,
}

impl Peer {
    fn new(p: &UdpPeer) -> io::Result<Peer> {
        let rss = match &p.rss {
            Some(r) => Some(r.build().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("peer {}: unusable RSS key or table", p.addr))
            })?),
            None => None,
        };
        let queues = p.rss.as_ref().map_or(1, queues_of);
        if u32::from(p.addr.port()) + u32::from(queues) > 65536 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("peer {}: queue ports past 65535", p.addr),
            ));
        }
        Ok(Peer { addr: p.addr, sa: sockaddr(p.addr), mac: p.mac, queues, rss })
    }

    /// The address of the queue its NIC would pick for `frame`.
    fn addr_for(&self, frame: &[u8]) -> libc::sockaddr_in {
        let mut sa = self.sa;
        if let Some(rss) = &self.rss {
            if frame[0] & 1 == 0 {
                sa.sin_port = (self.addr.port() + rss_queue(rss, frame)).to_be();
            }
        }
        sa
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// A UDP tunnel port: one queue of a tunnel device; checksums in software.
pub struct UdpPort {
    sock: UdpSocket,
    peers: ArrayVec<Peer, MAX_PEERS>,
    /// This queue's buffers, in front of the device's common set.
    pool: CachedPool,
    caps: Capabilities,
    stats: PortStats,
    ustats: UdpStats,
    scratch: Burst<HeapBuf>,
}

impl std::fmt::Debug for UdpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpPort")
            .field("local", &self.sock.local_addr().ok())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

fn set_buf_opt(fd: RawFd, force: libc::c_int, plain: libc::c_int, size: usize) {
    let v = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    for opt in [force, plain] {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid `c_int` on the stack;
        // `fd` is an open socket owned by the caller.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                core::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

impl UdpPort {
    /// Binds the socket and fills the pool. Errors: bind failure, more than [`MAX_PEERS`] peers.
    pub fn new(cfg: &UdpConfig) -> io::Result<Self> {
        let buf_size = cfg.mtu + 14;
        Self::with_pool(cfg, CachedPool::new(shared_spare(buf_size, cfg.buffers), cfg.buffers, buf_size, cfg.buffers))
    }

    fn with_pool(cfg: &UdpConfig, pool: CachedPool) -> io::Result<Self> {
        if cfg.peers.len() > MAX_PEERS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("at most {MAX_PEERS} UDP tunnel peers")));
        }
        let sock = UdpSocket::bind(cfg.bind)?;
        sock.set_nonblocking(true)?;
        set_buf_opt(sock.as_raw_fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, cfg.socket_buffer);
        set_buf_opt(sock.as_raw_fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, cfg.socket_buffer);
        // Kernel receive timestamps: they let the transport tell network delay from the time a
        // frame waited for this process to be scheduled.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a valid stack variable; the socket is open.
        let _ = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                core::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let peers = cfg.peers.iter().map(Peer::new).collect::<io::Result<_>>()?;
        Ok(UdpPort {
            sock,
            peers,
            pool,
            caps: Capabilities { mac: cfg.mac, mtu: cfg.mtu, queues: 1, rss: None, checksum: ChecksumCaps::software() },
            stats: PortStats::default(),
            ustats: UdpStats::default(),
            scratch: Burst::new(),
        })
    }

    /// A tunnel device of `queues` queues: queue *q* binds `cfg.bind`'s port + *q*; each port
    /// publishes the device's RSS key (`cfg.rss_key`) and its round-robin table of
    /// [`RETA_SIZE`] entries, which the peers must be given (see [`UdpPeer::with_queues`]). One
    /// queue is [`new`](Self::new): no RSS. The queues share one set of `queues * cfg.buffers`
    /// buffers (each starts with `cfg.buffers`), so a frame received on one queue and freed on
    /// another (handed between shards) is not lost to the first.
    pub fn open_queues(cfg: &UdpConfig, queues: u16) -> io::Result<Vec<UdpPort>> {
        let rss = default_rss(queues, &cfg.rss_key);
        if rss.as_ref().is_some_and(|r| r.build().is_none()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "RSS key shorter than 16 bytes"));
        }
        if u32::from(cfg.bind.port()) + u32::from(queues) > 65536 || (queues > 1 && cfg.bind.port() == 0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "queue ports must lie in 1..=65535"));
        }
        let buf_size = cfg.mtu + 14;
        let total = usize::from(queues.max(1)) * cfg.buffers;
        let spare = shared_spare(buf_size, total);
        (0..queues.max(1))
            .map(|q| {
                let bind = SocketAddrV4::new(*cfg.bind.ip(), cfg.bind.port() + q);
                let pool = CachedPool::new(spare.clone(), cfg.buffers, buf_size, total);
                let mut p = UdpPort::with_pool(&UdpConfig { bind, ..cfg.clone() }, pool)?;
                p.caps.queues = queues.max(1);
                p.caps.rss = rss.clone();
                Ok(p)
            })
            .collect()
    }

    /// The bound socket address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddrV4> {
        match self.sock.local_addr()? {
            std::net::SocketAddr::V4(a) => Ok(a),
            std::net::SocketAddr::V6(_) => Err(io::Error::other("IPv6 tunnel socket")),
        }
    }

    /// The socket's file descriptor, for readiness polling when idle.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Tunnel-specific counters.
    pub fn udp_stats(&self) -> UdpStats {
        self.ustats
    }

    /// Adds a peer at run time. Errors if the table is full.
    pub fn add_peer(&mut self, peer: UdpPeer) -> io::Result<()> {
        if self.peers.iter().any(|p| p.addr == peer.addr) {
            return Ok(());
        }
        let p = Peer::new(&peer)?;
        self.peers.try_push(p).map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "UDP tunnel peer table full"))
    }

    /// The peer that sent from `sa`: its IP, and the port of one of its queues.
    fn peer_of(&self, sa: &libc::sockaddr_in) -> Option<usize> {
        let port = u16::from_be(sa.sin_port);
        self.peers.iter().position(|p| {
            p.sa.sin_addr.s_addr == sa.sin_addr.s_addr
                && port >= p.addr.port()
                && u32::from(port) < u32::from(p.addr.port()) + u32::from(p.queues)
        })
    }

    /// Destinations of a frame: `Some(i)` for one peer, `None` for all.
    fn destination(&self, frame: &[u8]) -> Option<usize> {
        if frame.len() < 6 || frame[0] & 1 != 0 {
            return None;
        }
        let dst = EthernetAddress::from_bytes(&frame[..6]);
        self.peers.iter().position(|p| p.mac == Some(dst))
    }
}

impl Port for UdpPort {
    type Buf = HeapBuf;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn alloc(&mut self) -> Option<HeapBuf> {
        let b = self.pool.get();
        if b.is_none() {
            self.stats.alloc_failures += 1;
        }
        b
    }

    fn free(&mut self, buf: HeapBuf) {
        self.pool.put(buf);
    }

    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        let want = out.remaining_capacity().min(BURST);
        while self.scratch.len() < want {
            match self.pool.get() {
                Some(b) => self.scratch.push(b),
                None => break,
            }
        }
        let n = self.scratch.len();
        if n == 0 {
            return 0;
        }
        // SAFETY: `iovec`, `sockaddr_in` and `mmsghdr` are plain C structs for which all-zero
        // bytes are a valid value.
        let mut iov: [libc::iovec; BURST] = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut addrs: [libc::sockaddr_in; BURST] = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BURST] = unsafe { core::mem::zeroed() };
        // Control space for one SCM_TIMESTAMPNS per datagram (u64 words keep cmsg alignment).
        let mut ctrl = [[0u64; CTRL_WORDS]; BURST];
        for i in 0..n {
            let storage = self.scratch[i].storage_mut();
            iov[i] = libc::iovec { iov_base: storage.as_mut_ptr().cast(), iov_len: storage.len() };
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            hdrs[i].msg_hdr.msg_namelen = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_control = ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = core::mem::size_of_val(&ctrl[i]) as _;
        }
        // SAFETY: `hdrs[..n]` point at `iov[..n]` and `addrs[..n]`, which live on this stack frame
        // for the whole call; each iovec covers exactly the storage of a buffer owned by
        // `self.scratch`, which is not touched until the call returns.
        let r = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                core::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        let r = r as usize;
        let mut delivered = 0;
        // Kernel timestamps are CLOCK_REALTIME; this shifts them onto CLOCK_MONOTONIC.
        let offset = realtime_minus_monotonic();
        // Walk the received prefix in order; buffers that are dropped go back to `scratch`'s
        // tail via the pool.
        let mut bufs: Burst<HeapBuf> = self.scratch.drain(..r).collect();
        for (i, mut b) in bufs.drain(..).enumerate() {
            let len = hdrs[i].msg_len as usize;
            if hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.ustats.rx_oversize += 1;
                self.stats.rx_dropped += 1;
                self.pool.put(b);
                continue;
            }
            if len < 14 {
                self.ustats.rx_short += 1;
                self.stats.rx_dropped += 1;
                self.pool.put(b);
                continue;
            }
            let Some(pi) = self.peer_of(&addrs[i]) else {
                self.ustats.rx_unknown_sender += 1;
                self.stats.rx_dropped += 1;
                self.pool.put(b);
                continue;
            };
            b.set_len(len);
            if let Some(rt) = rx_realtime_ns(&hdrs[i].msg_hdr) {
                b.set_rx_timestamp(crate::time::Instant((rt as i64 - offset).max(1) as u64));
            }
            let src = EthernetAddress::from_bytes(&b.frame()[6..12]);
            if src.is_unicast() {
                self.peers[pi].mac = Some(src);
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += len as u64;
            out.push(b);
            delivered += 1;
        }
        delivered
    }

    fn tx_burst(&mut self, pkts: &mut Burst<HeapBuf>) -> usize {
        if pkts.is_empty() {
            return 0;
        }
        if self.peers.is_empty() {
            // Nowhere to send: the frames are gone, as on an unplugged cable.
            for b in pkts.drain(..) {
                self.stats.tx_packets += 1;
                self.pool.put(b);
            }
            return 0;
        }
        // SAFETY: plain C structs, all-zero is valid.
        let mut iov: [libc::iovec; BURST] = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; TX_BATCH] = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut names: [libc::sockaddr_in; TX_BATCH] = unsafe { core::mem::zeroed() };
        // For each frame, the index one past its last datagram.
        let mut ends: ArrayVec<usize, BURST> = ArrayVec::new();
        let mut n = 0usize;
        for (fi, b) in pkts.iter().enumerate() {
            let dsts = match self.destination(b.frame()) {
                Some(_) => 1,
                None => self.peers.len(),
            };
            if n + dsts > TX_BATCH && fi > 0 {
                break;
            }
            let frame = b.frame();
            iov[fi] = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
            let targets: ArrayVec<usize, MAX_PEERS> = match self.destination(frame) {
                Some(p) => core::iter::once(p).collect(),
                None => (0..self.peers.len()).collect(),
            };
            for p in targets.into_iter().take(TX_BATCH - n) {
                // The queue the peer's "NIC" picks (queue 0 for broadcasts and non-IPv4).
                names[n] = self.peers[p].addr_for(frame);
                let h = &mut hdrs[n].msg_hdr;
                h.msg_iov = &mut iov[fi];
                h.msg_iovlen = 1;
                h.msg_name = (&mut names[n] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                n += 1;
            }
            ends.push(n);
        }
        // SAFETY: `hdrs[..n]` point at `iov` entries and `names` that live across the call;
        // each iovec covers a frame owned by `pkts`, which is not modified during the call; the
        // kernel only reads these buffers.
        let r =
            unsafe { libc::sendmmsg(self.sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
        let sent_dgrams = if r < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => 0,
                _ => {
                    // A persistent error: drop the first frame so the caller cannot spin on it.
                    self.ustats.tx_errors += 1;
                    let b = pkts.remove(0);
                    self.pool.put(b);
                    return 1;
                }
            }
        } else {
            r as usize
        };
        // A frame counts as sent once its first datagram went out (broadcasts are best effort).
        let mut frames = 0;
        let mut start = 0;
        for &end in &ends {
            if start < sent_dgrams {
                frames += 1;
            }
            start = end;
        }
        for b in pkts.drain(..frames) {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += b.len() as u64;
            self.pool.put(b);
        }
        self.stats.tx_busy += pkts.len() as u64;
        frames
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lo(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
    }

    fn frame_to(port: &mut UdpPort, dst: EthernetAddress, tag: u8, len: usize) -> HeapBuf {
        let mut b = port.alloc().unwrap();
        let s = b.storage_mut();
        s[..6].copy_from_slice(&dst.0);
        s[6..12].copy_from_slice(&port.caps.mac.0);
        s[12] = 0x08;
        s[13] = 0x00;
        s[14..len].fill(tag);
        b.set_len(len);
        b
    }

    fn recv_all(port: &mut UdpPort, want: usize) -> Vec<(u8, usize)> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut burst = Burst::new();
        while got.len() < want && std::time::Instant::now() < deadline {
            port.rx_burst(&mut burst);
            for b in burst.drain(..) {
                got.push((b.frame()[14], b.len()));
                port.free(b);
            }
        }
        got
    }

    #[test]
    fn tunnel_roundtrip_learning_and_bad_datagrams() {
        let mac_a = EthernetAddress([2, 0, 0, 0, 0, 0xa]);
        let mac_b = EthernetAddress([2, 0, 0, 0, 0, 0xb]);
        let mut a = UdpPort::new(&UdpConfig::new(lo(0), mac_a, vec![])).unwrap();
        let mut b = UdpPort::new(&UdpConfig::new(lo(0), mac_b, vec![])).unwrap();
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        a.add_peer(UdpPeer::new(ba)).unwrap();
        b.add_peer(UdpPeer { mac: Some(mac_a), ..UdpPeer::new(aa) }).unwrap();

        // Broadcast and unknown unicast flood; a full burst goes in one call.
        let mut burst = Burst::new();
        for i in 0..BURST {
            let dst = if i == 0 { EthernetAddress::BROADCAST } else { mac_b };
            burst.push(frame_to(&mut a, dst, i as u8, 60 + i));
        }
        assert_eq!(a.tx_burst(&mut burst), BURST);
        let got = recv_all(&mut b, BURST);
        assert_eq!(got, (0..BURST).map(|i| (i as u8, 60 + i)).collect::<Vec<_>>());

        // b learned nothing new (mac_a configured); a learns mac_b from b's reply.
        let mut burst = Burst::new();
        burst.push(frame_to(&mut b, mac_a, 7, 100));
        assert_eq!(b.tx_burst(&mut burst), 1);
        assert_eq!(recv_all(&mut a, 1), vec![(7, 100)]);
        assert_eq!(a.peers[0].mac, Some(mac_b));

        // Received frames carry the kernel's receive time on the CLOCK_MONOTONIC base.
        let sent_at = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let mut burst = Burst::new();
        burst.push(frame_to(&mut b, mac_a, 8, 64));
        assert_eq!(b.tx_burst(&mut burst), 1);
        let mut rx = Burst::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rx.is_empty() && std::time::Instant::now() < deadline {
            a.rx_burst(&mut rx);
        }
        let ts = rx[0].rx_timestamp().expect("kernel timestamp").as_nanos();
        let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        assert!(ts + 2_000_000 >= sent_at && ts <= now + 2_000_000, "rx {ts} sent {sent_at} now {now}");
        for f in rx.drain(..) {
            a.free(f);
        }

        // Garbage: short, oversize, unknown sender. All counted and dropped.
        let stranger = UdpSocket::bind(lo(0)).unwrap();
        stranger.send_to(&[0u8; 60], ba).unwrap();
        let peer_sock = UdpSocket::bind(lo(0)).unwrap();
        b.add_peer(UdpPeer::new(match peer_sock.local_addr().unwrap() {
            std::net::SocketAddr::V4(x) => x,
            _ => unreachable!(),
        }))
        .unwrap();
        peer_sock.send_to(&[0u8; 5], ba).unwrap();
        peer_sock.send_to(&[0u8; 3000], ba).unwrap();
        peer_sock.send_to(&[9u8; 64], ba).unwrap();
        let got = recv_all(&mut b, 1);
        assert_eq!(got, vec![(9, 64)]);
        let us = b.udp_stats();
        assert_eq!((us.rx_short, us.rx_oversize, us.rx_unknown_sender), (1, 1, 1));
        assert_eq!(b.stats().rx_dropped, 3);
    }

    /// An IPv4/UDP frame (headers only as far as the hash reads them) tagged in its payload.
    fn udp_frame(port: &mut UdpPort, dst: EthernetAddress, t: (Ipv4Addr, Ipv4Addr, u16, u16), tag: u8) -> HeapBuf {
        let mut b = frame_to(port, dst, 0, 64);
        let s = b.storage_mut();
        s[14] = 0x45;
        s[20..22].copy_from_slice(&0x4000u16.to_be_bytes()); // DF, no fragment
        s[23] = 17;
        s[26..30].copy_from_slice(&t.0.octets());
        s[30..34].copy_from_slice(&t.1.octets());
        s[34..36].copy_from_slice(&t.2.to_be_bytes());
        s[36..38].copy_from_slice(&t.3.to_be_bytes());
        s[42] = tag;
        b
    }

    #[test]
    fn a_multi_queue_peer_gets_each_frame_on_the_queue_its_nic_would_pick() {
        let mac_a = EthernetAddress([2, 0, 0, 0, 0, 0xa]);
        let mac_b = EthernetAddress([2, 0, 0, 0, 0, 0xb]);
        // B: three queues with a key of its own; A: one queue, told B's key.
        let key_b: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        let mut qs = None;
        for base in (34000..60000).step_by(97) {
            let cfg = UdpConfig { rss_key: key_b.clone(), ..UdpConfig::new(lo(base), mac_b, vec![]) };
            if let Ok(q) = UdpPort::open_queues(&cfg, 3) {
                qs = Some(q);
                break;
            }
        }
        let mut b = qs.expect("three free consecutive loopback ports");
        let base = b[0].local_addr().unwrap();
        assert_eq!(b.iter().map(|p| p.local_addr().unwrap().port() - base.port()).collect::<Vec<_>>(), [0, 1, 2]);
        let rss = b[1].capabilities().rss.clone().expect("a multi-queue device publishes its RSS state");
        assert_eq!((b[2].capabilities().queues, rss.key.clone(), rss.reta.len()), (3, key_b.clone(), RETA_SIZE));
        let mut a = UdpPort::new(&UdpConfig::new(lo(0), mac_a, vec![])).unwrap();
        let aa = a.local_addr().unwrap();
        a.add_peer(UdpPeer { mac: Some(mac_b), ..UdpPeer::with_queues(base, 3, &key_b) }).unwrap();
        for q in &mut b {
            q.add_peer(UdpPeer { mac: Some(mac_a), ..UdpPeer::new(aa) }).unwrap();
        }
        // Frames of 96 tuples: each must arrive on the queue the reference Toeplitz hash of its
        // 4-tuple under B's key picks through a round-robin table of 128 entries.
        let (ia, ib) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let mut want = [Vec::new(), Vec::new(), Vec::new()];
        for k in 0..96u16 {
            let t = (ia, ib, 1024 + k * 13, 888);
            let h = crate::rss::toeplitz(&key_b, &crate::rss::ipv4_tuple_input(t.0, t.1, t.2, t.3));
            want[usize::from((h % 128) as u16 % 3)].push(k as u8);
            let mut burst = Burst::new();
            burst.push(udp_frame(&mut a, mac_b, t, k as u8));
            assert_eq!(a.tx_burst(&mut burst), 1);
        }
        // ARP (not IPv4) and broadcasts go to queue 0.
        let mut burst = Burst::new();
        burst.push(frame_to(&mut a, EthernetAddress::BROADCAST, 200, 60));
        let mut arp = frame_to(&mut a, mac_b, 201, 60);
        arp.storage_mut()[12..14].copy_from_slice(&[0x08, 0x06]);
        burst.push(arp);
        assert_eq!(a.tx_burst(&mut burst), 2);
        want[0].extend([200, 201]);
        for (q, w) in want.iter().enumerate() {
            assert!(!w.is_empty(), "96 tuples reach queue {q} too");
            let mut burst = Burst::new();
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while got.len() < w.len() && std::time::Instant::now() < deadline {
                b[q].rx_burst(&mut burst);
                for f in burst.drain(..) {
                    got.push(if f.frame()[12..14] == [0x08, 0x00] { f.frame()[42] } else { f.frame()[14] });
                    b[q].free(f);
                }
            }
            assert_eq!(&got, w, "queue {q}");
        }
        // A recognises B from any of its queues' ports.
        let mut burst = Burst::new();
        burst.push(frame_to(&mut b[2], mac_a, 9, 64));
        assert_eq!(b[2].tx_burst(&mut burst), 1);
        assert_eq!(recv_all(&mut a, 1), vec![(9, 64)]);
        assert_eq!(a.udp_stats().rx_unknown_sender, 0);
    }
}
