//! The control socket: a versioned protocol of fixed 64-byte messages over a unix stream
//! socket, its non-blocking server end for the daemon's controller thread, and the client end.
//!
//! One connection per application process, kept open for the process's lifetime: its first
//! request is `REGISTER` (the server records the peer's pid, uid and gid from `SO_PEERCRED`),
//! then any number of `CREATE_CHANNEL` (the reply carries the memfd and the two doorbell
//! eventfds as `SCM_RIGHTS`) and `DETACH_CHANNEL`. Every request gets exactly one reply, in
//! order; a malformed or unknown one gets an error reply. When the connection closes the
//! application is gone and the handler reclaims everything it had. See `docs/channel.md`.
//!
//! Message (all little-endian):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MNCT` (0x54434E4D) |
//! | 4 | 2 | version (1) |
//! | 6 | 2 | kind: 1 REGISTER, 2 CREATE_CHANNEL, 3 DETACH_CHANNEL, 4 STATS, 5 CAPTURE; a reply sets bit 15; 0xFFFF = error reply to an unparsable message |
//! | 8 | 4 | seq: chosen by the client, echoed |
//! | 12 | 4 | status ([`Status`] code; 0 in requests) |
//! | 16 | 8 | channel id (CREATE reply, DETACH request) |
//! | 24 | 4 | pid (REGISTER reply: as seen by the server) |
//! | 28 | 4 | uid (same) |
//! | 32 | 4 | gid (same) |
//! | 36 | 4 | number of descriptors attached (CREATE reply: 3) |
//! | 40 | 24 | arguments of CAPTURE (see [`KIND_CAPTURE`]); otherwise reserved, zero |

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::AppFds;
use crate::ops::Status;

/// Default control socket path.
pub const DEFAULT_CTRL_SOCK: &str = "/var/run/machnet/machnet_ctrl.sock";
/// Environment variable that overrides the client's socket path.
pub const CTRL_SOCK_ENV: &str = "MACHNET_CTRL_SOCK";
/// Message magic (`MNCT`).
pub const CTRL_MAGIC: u32 = u32::from_le_bytes(*b"MNCT");
/// Protocol version.
pub const CTRL_VERSION: u16 = 1;
/// Every message is exactly this long.
pub const CTRL_MSG_LEN: usize = 64;
/// Kind: register this connection as an application.
pub const KIND_REGISTER: u16 = 1;
/// Kind: create a channel.
pub const KIND_CREATE_CHANNEL: u16 = 2;
/// Kind: detach (destroy) a channel.
pub const KIND_DETACH_CHANNEL: u16 = 3;
/// Request: the daemon's statistics (no registration needed). `channel` carries a selector
/// the handler interprets; the reply carries one descriptor, a sealed memfd holding the
/// answer (JSON), whose length is in the reply's `channel` field.
pub const KIND_STATS: u16 = 4;
/// Request: packet capture (`machnetctl capture`; no registration needed, the statistics
/// access rules apply). `channel` is the operation: [`CAPTURE_START`] (bytes 40..64 carry the
/// filter, see the daemon's `capture` module), [`CAPTURE_READ`], [`CAPTURE_STOP`]. The reply
/// carries a sealed memfd like `STATS`: pcapng bytes after a 16-byte prefix (captures dropped
/// so far, packets in this reply; two little-endian u64). A capture belongs to the connection
/// that started it and stops when that connection closes.
pub const KIND_CAPTURE: u16 = 5;
/// [`KIND_CAPTURE`] operation: start; the reply holds the pcapng section and interface headers.
pub const CAPTURE_START: u64 = 1;
/// [`KIND_CAPTURE`] operation: the packets captured since the last read.
pub const CAPTURE_READ: u64 = 2;
/// [`KIND_CAPTURE`] operation: stop; the reply holds the last packets.
pub const CAPTURE_STOP: u64 = 3;
/// Largest statistics reply a client accepts.
pub const STATS_LIMIT: usize = 64 << 20;
/// Bit set in the kind of every reply.
pub const KIND_REPLY: u16 = 0x8000;
/// Kind of the reply to a message that could not be parsed (bad magic or version).
pub const KIND_ERROR: u16 = 0xFFFF;
/// Descriptors attached to a CREATE_CHANNEL reply: memfd, app doorbell, engine doorbell.
pub const CHANNEL_FDS: usize = 3;

/// The socket path a client uses: `$MACHNET_CTRL_SOCK` or [`DEFAULT_CTRL_SOCK`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(CTRL_SOCK_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_CTRL_SOCK))
}

/// One control message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlMsg {
    /// Kind (see `KIND_*`).
    pub kind: u16,
    /// Sequence number, echoed in the reply.
    pub seq: u32,
    /// Status code ([`Status::code`]).
    pub status: u32,
    /// Channel id.
    pub channel: u64,
    /// Peer pid as the server sees it.
    pub pid: u32,
    /// Peer uid as the server sees it.
    pub uid: u32,
    /// Peer gid as the server sees it.
    pub gid: u32,
    /// Descriptors attached.
    pub nfds: u32,
    /// Bytes 40..64: request arguments ([`KIND_CAPTURE`]); zero otherwise.
    pub args: [u8; 24],
}

/// Why a message could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Wrong magic.
    Magic,
    /// Unsupported version.
    Version(u16),
}

impl CtrlMsg {
    /// A request of `kind`.
    pub fn request(kind: u16, seq: u32) -> CtrlMsg {
        CtrlMsg { kind, seq, ..Default::default() }
    }

    /// The reply to `self` with `status`.
    pub fn reply(&self, status: Status) -> CtrlMsg {
        CtrlMsg { kind: self.kind | KIND_REPLY, seq: self.seq, status: status.code(), ..Default::default() }
    }

    /// Serialises the message.
    pub fn encode(&self) -> [u8; CTRL_MSG_LEN] {
        let mut b = [0u8; CTRL_MSG_LEN];
        b[0..4].copy_from_slice(&CTRL_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&CTRL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.status.to_le_bytes());
        b[16..24].copy_from_slice(&self.channel.to_le_bytes());
        b[24..28].copy_from_slice(&self.pid.to_le_bytes());
        b[28..32].copy_from_slice(&self.uid.to_le_bytes());
        b[32..36].copy_from_slice(&self.gid.to_le_bytes());
        b[36..40].copy_from_slice(&self.nfds.to_le_bytes());
        b[40..64].copy_from_slice(&self.args);
        b
    }

    /// Parses a message.
    pub fn decode(b: &[u8; CTRL_MSG_LEN]) -> Result<CtrlMsg, DecodeError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        if u32_at(0) != CTRL_MAGIC {
            return Err(DecodeError::Magic);
        }
        let v = u16_at(4);
        if v != CTRL_VERSION {
            return Err(DecodeError::Version(v));
        }
        Ok(CtrlMsg {
            kind: u16_at(6),
            seq: u32_at(8),
            status: u32_at(12),
            channel: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            pid: u32_at(24),
            uid: u32_at(28),
            gid: u32_at(32),
            nfds: u32_at(36),
            args: b[40..64].try_into().unwrap(),
        })
    }
}

/// Credentials of a connected peer (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` and `len` are valid out-parameters of the right size for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred { pid: c.pid as u32, uid: c.uid, gid: c.gid })
}

/// Sends `data` with `fds` attached as `SCM_RIGHTS` (one `sendmsg`).
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = if raw.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(payload) }) as usize };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, 8-aligned, so the first
        // header and its data (CMSG_LEN(payload)) fit; we write exactly `raw.len()` fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), raw.len());
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives into `buf` and collects up to `max_fds` descriptors (close-on-exec). Extra
/// descriptors beyond `max_fds` are closed by the kernel (`MSG_CTRUNC`).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: pure size computation.
    let space = (unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) }) as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is valid; fields set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at live buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of our buffer with cmsg headers; the
    // CMSG_* macros walk them within that length. SCM_RIGHTS data are ints, each a new fd
    // that we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// Identifies one registration connection (= one application) for the server's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(pub u64);

/// A channel the handler created, to be sent to the application.
#[derive(Debug)]
pub struct ChannelGrant {
    /// Channel id, unique within the daemon.
    pub id: u64,
    /// Descriptors for the application (closed by the server after sending).
    pub fds: AppFds,
}

/// The daemon's side of the control protocol, called by [`CtrlServer::poll`].
pub trait CtrlHandler {
    /// A connection registered. Return an error status to refuse it.
    fn register(&mut self, app: AppId, cred: PeerCred) -> Result<(), Status>;
    /// A registered application asks for a channel.
    fn create_channel(&mut self, app: AppId) -> Result<ChannelGrant, Status>;
    /// A registered application detaches a channel it owns.
    fn detach_channel(&mut self, app: AppId, channel: u64) -> Result<(), Status>;
    /// The registration connection closed: the application is gone. Reclaim all it had.
    fn app_gone(&mut self, app: AppId);
    /// A statistics request (`KIND_STATS`) from a peer with credentials `cred`: the reply
    /// bytes, or an error status (for example `NotPermitted`). Not supported by default.
    fn stats(&mut self, cred: PeerCred, selector: u64) -> Result<Vec<u8>, Status> {
        let _ = (cred, selector);
        Err(Status::BadRequest)
    }
    /// A packet-capture request (`KIND_CAPTURE`, operation `op`, arguments `args`) on
    /// connection `conn`: the reply bytes or an error status. Not supported by default.
    fn capture(&mut self, conn: AppId, cred: PeerCred, op: u64, args: [u8; 24]) -> Result<Vec<u8>, Status> {
        let _ = (conn, cred, op, args);
        Err(Status::BadRequest)
    }
    /// Connection `conn` closed, registered or not (after [`app_gone`](Self::app_gone) for a
    /// registered one).
    fn conn_closed(&mut self, conn: AppId) {
        let _ = conn;
    }
}

struct Conn {
    stream: UnixStream,
    app: AppId,
    cred: PeerCred,
    registered: bool,
    buf: [u8; CTRL_MSG_LEN],
    filled: usize,
}

/// The non-blocking server end of the control socket.
pub struct CtrlServer {
    path: PathBuf,
    ino: (u64, u64),
    listener: UnixListener,
    conns: Vec<Conn>,
    next_app: u64,
}

impl std::fmt::Debug for CtrlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrlServer").field("path", &self.path).field("connections", &self.conns.len()).finish()
    }
}

impl CtrlServer {
    /// Binds `path` with mode 0666. See [`CtrlServer::bind_with_mode`].
    pub fn bind(path: impl AsRef<Path>) -> io::Result<CtrlServer> {
        Self::bind_with_mode(path, 0o666)
    }

    /// Creates the parent directory if needed, replaces a stale socket (one nobody listens
    /// on; a live one is `AddrInUse`, a non-socket file `AlreadyExists`), binds, and sets the
    /// socket file's permissions to `mode`. The file is removed on drop.
    pub fn bind_with_mode(path: impl AsRef<Path>, mode: u32) -> io::Result<CtrlServer> {
        Self::bind_with(path, mode, None)
    }

    /// As [`CtrlServer::bind_with_mode`], the socket also owned by group `group` (if given)
    /// before it appears at `path`.
    pub fn bind_with(path: impl AsRef<Path>, mode: u32, group: Option<u32>) -> io::Result<CtrlServer> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_socket() => match UnixStream::connect(&path) {
                Ok(_) => return Err(io::Error::new(io::ErrorKind::AddrInUse, "a control server is already running")),
                Err(_) => std::fs::remove_file(&path)?,
            },
            Ok(_) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "control socket path exists, not a socket"))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Bind, listen and set the mode under a temporary name, then rename: the socket appears
        // at `path` only when it accepts connections with its final permissions (a client
        // that sees the file never gets "connection refused" or "permission denied" from a
        // half-made socket). Paths too long for the temporary name are bound in place.
        let tmp = {
            let mut t = path.clone().into_os_string();
            t.push(format!(".{}.tmp", std::process::id()));
            PathBuf::from(t)
        };
        let listener = if tmp.as_os_str().len() < 100 {
            let _ = std::fs::remove_file(&tmp);
            let l = UnixListener::bind(&tmp)?;
            let staged = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .and_then(|()| std::os::unix::fs::chown(&tmp, None, group))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = staged {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            l
        } else {
            let l = UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            std::os::unix::fs::chown(&path, None, group)?;
            l
        };
        listener.set_nonblocking(true)?;
        let md = std::fs::symlink_metadata(&path)?;
        Ok(CtrlServer { path, ino: (md.dev(), md.ino()), listener, conns: Vec::new(), next_app: 1 })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Waits up to `timeout` (`None` = forever) for activity, then accepts connections, reads
    /// requests, calls `handler` and replies. Returns the number of requests answered plus
    /// connections closed. Never blocks on a single client: a client whose reply cannot be
    /// sent at once (it does not read) is disconnected and treated as gone.
    pub fn poll(&mut self, timeout: Option<Duration>, handler: &mut impl CtrlHandler) -> io::Result<usize> {
        self.poll_also(timeout, handler, &[])
    }

    /// [`poll`](Self::poll) that also wakes when one of `also` (descriptors the caller serves
    /// itself, such as machnetd's metrics listener) is readable; the caller then looks at them.
    pub fn poll_also(
        &mut self,
        timeout: Option<Duration>,
        handler: &mut impl CtrlHandler,
        also: &[RawFd],
    ) -> io::Result<usize> {
        let mut pfds = Vec::with_capacity(self.conns.len() + 1 + also.len());
        pfds.push(libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        for c in &self.conns {
            pfds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let ours = pfds.len();
        pfds.extend(also.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        // SAFETY: `pfds` is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, crate::shm::timeout_ms(timeout)) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        let mut done = 0;
        // Existing connections first (indices match `pfds[1..]`), then accept new ones.
        let mut closed = Vec::new();
        for (i, p) in pfds[1..ours].iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let (answered, alive) = Self::serve(&mut self.conns[i], handler);
            done += answered;
            if !alive {
                closed.push(i);
            }
        }
        for &i in closed.iter().rev() {
            let c = self.conns.swap_remove(i);
            if c.registered {
                handler.app_gone(c.app);
            }
            handler.conn_closed(c.app);
            done += 1;
        }
        if pfds[0].revents != 0 {
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(true)?;
                        let cred =
                            peer_cred(stream.as_fd()).unwrap_or(PeerCred { pid: 0, uid: u32::MAX, gid: u32::MAX });
                        let app = AppId(self.next_app);
                        self.next_app += 1;
                        let mut c = Conn { stream, app, cred, registered: false, buf: [0; CTRL_MSG_LEN], filled: 0 };
                        // Requests may already be waiting.
                        let (answered, alive) = Self::serve(&mut c, handler);
                        done += answered;
                        if alive {
                            self.conns.push(c);
                        } else {
                            if c.registered {
                                handler.app_gone(c.app);
                            }
                            handler.conn_closed(c.app);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        }
        Ok(done)
    }

    /// Reads and answers every complete request on `c`. Returns (answered, still open).
    fn serve(c: &mut Conn, handler: &mut impl CtrlHandler) -> (usize, bool) {
        let mut answered = 0;
        loop {
            match c.stream.read(&mut c.buf[c.filled..]) {
                Ok(0) => return (answered, false),
                Ok(n) => {
                    c.filled += n;
                    if c.filled == CTRL_MSG_LEN {
                        c.filled = 0;
                        let buf = c.buf;
                        if !Self::answer(c, &buf, handler) {
                            return (answered, false);
                        }
                        answered += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (answered, true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return (answered, false),
            }
        }
    }

    /// Handles one request and sends its reply; false if the reply could not be sent.
    fn answer(c: &mut Conn, raw: &[u8; CTRL_MSG_LEN], handler: &mut impl CtrlHandler) -> bool {
        let req = match CtrlMsg::decode(raw) {
            Ok(m) => m,
            Err(e) => {
                let seq = u32::from_le_bytes(raw[8..12].try_into().unwrap());
                let status = match e {
                    DecodeError::Magic => Status::BadRequest,
                    DecodeError::Version(_) => Status::BadVersion,
                };
                let m = CtrlMsg { kind: KIND_ERROR, seq, status: status.code(), ..Default::default() };
                return send_all(&c.stream, &m.encode(), &[]);
            }
        };
        match req.kind {
            KIND_REGISTER => {
                let status = if c.registered {
                    Status::AlreadyRegistered
                } else {
                    match handler.register(c.app, c.cred) {
                        Ok(()) => {
                            c.registered = true;
                            Status::Ok
                        }
                        Err(s) => s,
                    }
                };
                let mut m = req.reply(status);
                (m.pid, m.uid, m.gid) = (c.cred.pid, c.cred.uid, c.cred.gid);
                send_all(&c.stream, &m.encode(), &[])
            }
            KIND_CREATE_CHANNEL if c.registered => match handler.create_channel(c.app) {
                Ok(g) => {
                    let mut m = req.reply(Status::Ok);
                    m.channel = g.id;
                    m.nfds = CHANNEL_FDS as u32;
                    let fds = [g.fds.memfd.as_fd(), g.fds.app_bell.as_fd(), g.fds.engine_bell.as_fd()];
                    let sent = send_all(&c.stream, &m.encode(), &fds);
                    if !sent {
                        // The app will never see this channel.
                        handler.detach_channel(c.app, g.id).ok();
                    }
                    sent
                }
                Err(s) => send_all(&c.stream, &req.reply(s).encode(), &[]),
            },
            KIND_STATS | KIND_CAPTURE => match if req.kind == KIND_STATS {
                handler.stats(c.cred, req.channel)
            } else {
                handler.capture(c.app, c.cred, req.channel, req.args)
            } {
                Ok(bytes) => match crate::shm::sealed_bytes("machnet-stats", &bytes) {
                    Ok(fd) => {
                        let mut m = req.reply(Status::Ok);
                        m.channel = bytes.len() as u64;
                        m.nfds = 1;
                        send_all(&c.stream, &m.encode(), &[fd.as_fd()])
                    }
                    Err(_) => send_all(&c.stream, &req.reply(Status::NoResources).encode(), &[]),
                },
                Err(s) => send_all(&c.stream, &req.reply(s).encode(), &[]),
            },
            KIND_DETACH_CHANNEL if c.registered => {
                let status = match handler.detach_channel(c.app, req.channel) {
                    Ok(()) => Status::Ok,
                    Err(s) => s,
                };
                let mut m = req.reply(status);
                m.channel = req.channel;
                send_all(&c.stream, &m.encode(), &[])
            }
            KIND_CREATE_CHANNEL | KIND_DETACH_CHANNEL => {
                send_all(&c.stream, &req.reply(Status::NotRegistered).encode(), &[])
            }
            _ => send_all(&c.stream, &req.reply(Status::BadRequest).encode(), &[]),
        }
    }
}

/// Sends a whole 64-byte message (with descriptors on the first byte). A reply is tiny, so a
/// short or blocked send means the peer stopped reading: give up on it.
fn send_all(s: &UnixStream, b: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    loop {
        match send_with_fds(s.as_fd(), b, fds) {
            Ok(n) => return n == b.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

impl Drop for CtrlServer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still ours (not replaced by another server).
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The client end: one registration connection, requests answered in order.
#[derive(Debug)]
pub struct CtrlClient {
    stream: UnixStream,
    seq: u32,
    /// A timeout or error cut a message in half: the byte stream is out of step for good.
    broken: bool,
}

/// How a client request failed.
#[derive(Debug)]
pub enum CallError {
    /// A system call failed (including the reply timeout: `WouldBlock`/`TimedOut`).
    Io(io::Error),
    /// The reply was malformed or did not match the request.
    Protocol,
    /// The server answered with an error status.
    Status(Status),
}

impl CtrlClient {
    /// Connects to `path`; replies must arrive within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<CtrlClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(CtrlClient { stream, seq: 0, broken: false })
    }

    /// The socket descriptor.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Asks for the daemon's statistics (`selector` as the daemon defines it); returns the
    /// reply's bytes.
    pub fn stats(&mut self, selector: u64) -> Result<Vec<u8>, CallError> {
        self.call_for_bytes(KIND_STATS, selector, [0; 24])
    }

    /// A packet-capture request ([`KIND_CAPTURE`]); returns the reply's bytes.
    pub fn capture(&mut self, op: u64, args: [u8; 24]) -> Result<Vec<u8>, CallError> {
        self.call_for_bytes(KIND_CAPTURE, op, args)
    }

    fn call_for_bytes(&mut self, kind: u16, channel: u64, args: [u8; 24]) -> Result<Vec<u8>, CallError> {
        let (m, fds) = self.call_with(kind, channel, args)?;
        let fd = fds.first().ok_or(CallError::Protocol)?;
        let bytes = crate::shm::read_all_at(fd.as_fd(), STATS_LIMIT).map_err(CallError::Io)?;
        if bytes.len() as u64 != m.channel {
            return Err(CallError::Protocol);
        }
        Ok(bytes)
    }

    /// Sends a request of `kind` (with `channel`) and waits for its reply and descriptors.
    ///
    /// A reply that missed an earlier call's timeout arrives late; it is recognised by its
    /// older sequence number and discarded (with its descriptors), so one timeout does not
    /// put every later call out of step. A timeout in the middle of a message cannot be
    /// recovered from: the connection is then reported broken.
    pub fn call(&mut self, kind: u16, channel: u64) -> Result<(CtrlMsg, Vec<OwnedFd>), CallError> {
        self.call_with(kind, channel, [0; 24])
    }

    fn call_with(&mut self, kind: u16, channel: u64, args: [u8; 24]) -> Result<(CtrlMsg, Vec<OwnedFd>), CallError> {
        if self.broken {
            return Err(CallError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the control connection fell out of step after a timeout",
            )));
        }
        self.seq = self.seq.wrapping_add(1);
        let mut req = CtrlMsg::request(kind, self.seq);
        req.channel = channel;
        req.args = args;
        if let Err(e) = self.send_all(&req.encode()) {
            // Part of the request may have gone out.
            self.broken = true;
            return Err(CallError::Io(e));
        }
        loop {
            let (m, fds) = self.read_reply()?;
            let behind = self.seq.wrapping_sub(m.seq);
            if m.kind & KIND_REPLY != 0 && m.kind != KIND_ERROR && behind != 0 && behind < 1 << 31 {
                continue; // the late answer to a call that timed out
            }
            if m.kind != kind | KIND_REPLY || m.seq != self.seq {
                return Err(CallError::Protocol);
            }
            return match Status::from_code(m.status) {
                Status::Ok => Ok((m, fds)),
                s => Err(CallError::Status(s)),
            };
        }
    }

    /// Writes the whole request with `MSG_NOSIGNAL`: a daemon that died must give the caller an
    /// error, not a SIGPIPE (a C application has the default, fatal, disposition).
    fn send_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match send_with_fds(self.stream.as_fd(), data, &[]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one whole reply and its descriptors.
    fn read_reply(&mut self) -> Result<(CtrlMsg, Vec<OwnedFd>), CallError> {
        let mut buf = [0u8; CTRL_MSG_LEN];
        let mut filled = 0;
        let mut fds = Vec::new();
        while filled < CTRL_MSG_LEN {
            let r = loop {
                match recv_with_fds(self.stream.as_fd(), &mut buf[filled..], CHANNEL_FDS) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let (n, mut got) = match r {
                Ok((0, _)) => {
                    self.broken = true;
                    return Err(CallError::Io(io::Error::from(io::ErrorKind::UnexpectedEof)));
                }
                Ok(x) => x,
                Err(e) => {
                    self.broken |= filled > 0;
                    return Err(CallError::Io(e));
                }
            };
            filled += n;
            fds.append(&mut got);
        }
        let m = CtrlMsg::decode(&buf).map_err(|_| CallError::Protocol)?;
        Ok((m, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_and_rejections() {
        let m = CtrlMsg {
            kind: KIND_CREATE_CHANNEL | KIND_REPLY,
            seq: 7,
            status: 5,
            channel: 1 << 40,
            pid: 1,
            uid: 2,
            gid: 3,
            nfds: 3,
            args: core::array::from_fn(|i| i as u8 + 1),
        };
        let b = m.encode();
        assert_eq!(b[40], 1, "the arguments fill bytes 40..64");
        assert_eq!(b[63], 24);
        assert_eq!(&b[0..4], b"MNCT");
        assert_eq!(CtrlMsg::decode(&b), Ok(m));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(CtrlMsg::decode(&bad), Err(DecodeError::Magic));
        let mut v2 = b;
        v2[4] = 2;
        assert_eq!(CtrlMsg::decode(&v2), Err(DecodeError::Version(2)));
    }
}
