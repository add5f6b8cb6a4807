//! The application side: register with the daemon ([`Machnet`]), attach channels
//! ([`Channel`]), and send and receive messages.
//!
//! ```no_run
//! use machnet::client::Machnet;
//! use std::net::Ipv4Addr;
//!
//! let m = Machnet::init()?; // $MACHNET_CTRL_SOCK or /var/run/machnet/machnet_ctrl.sock
//! let mut ch = m.attach()?;
//! let flow = ch.connect(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2), 888)?;
//! ch.send(flow, b"hello")?;
//! let mut buf = vec![0u8; 1 << 20];
//! if let Some((n, from)) = ch.recv_blocking(&mut buf, Some(std::time::Duration::from_secs(1)))? {
//!     println!("{n} bytes from {from}");
//! }
//! # Ok::<(), machnet::client::Error>(())
//! ```
//!
//! A [`Channel`] is `Send` but not `Sync`: use one channel per thread (attach as many as you
//! need). Data-path calls never block and never allocate; control calls (`listen`, `connect`,
//! `close`) wait for the engine's completion with a bounded timeout (5 s by default).

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;

use crate::ctrl::{self, CallError, CtrlClient, KIND_CREATE_CHANNEL, KIND_DETACH_CHANNEL, KIND_REGISTER};
use crate::engine::AppFds;
use crate::layout::{
    ChannelConfig, CtrlEntry, Header, Layout, MachnetFlow, MsgDesc, Part, MAGIC, MSG_MAX_LEN, NIL, STATE_ALIVE, VERSION,
};
use crate::ops::{Completion, CtrlOp, Event, Status};
use crate::pool::FreeList;
use crate::region::{set, Region};
use crate::ring::{Consumer, Corrupt, Producer};
use crate::shm::{self, Mapping};

/// Default time a control request (and the control socket) may take.
pub const DEFAULT_CTRL_TIMEOUT: Duration = Duration::from_secs(5);
/// Events kept for [`Channel::poll_event`]; the oldest is dropped beyond this.
const EVENT_QUEUE: usize = 256;
/// Empty polls before a waiting call sleeps on its doorbell.
const SPIN_POLLS: u32 = 256;
/// Timed-out connects remembered (and late flows queued for closing) at most.
const ABANDONED: usize = 16;
/// How often a non-blocking call that finds nothing to do looks for the daemon's death (a
/// `poll` of the registration socket): 10 ms.
const ALIVE_CHECK_NS: u64 = 10_000_000;

/// What a non-blocking call does when it finds nothing to do (an empty receive, a full ring):
/// `MACHNET_POLL=spin|yield|adaptive`, read once per process (default `adaptive`).
///
/// Applications written for Machnet busy-poll (`while (machnet_recv(...) == 0) {}`). When
/// such an application shares a CPU with its daemon's shard (or anything else), spinning
/// leaves the shard the scheduler's tick: every hand-off waits milliseconds. `adaptive` spins
/// for [`ADAPTIVE_SPIN`] empty calls in a row, then calls `sched_yield` in each further one, so
/// whoever waits for the CPU runs now; the call still returns at once (0: nothing), as the API
/// says. On a core of its own a yield returns at once too: it costs one system call (about a
/// microsecond here) per empty call after the spin. `spin` never yields (dedicated cores,
/// lowest latency); `yield` yields on every empty call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollPolicy {
    /// Never give the CPU away.
    Spin,
    /// Yield on every empty call.
    Yield,
    /// Spin briefly, then yield.
    Adaptive,
}

/// Empty calls in a row before an `adaptive` channel starts yielding (a few microseconds).
pub const ADAPTIVE_SPIN: u32 = 512;

impl PollPolicy {
    /// The process's policy, from `MACHNET_POLL` (read once).
    pub fn from_env() -> PollPolicy {
        static P: std::sync::OnceLock<PollPolicy> = std::sync::OnceLock::new();
        *P.get_or_init(|| match std::env::var("MACHNET_POLL").as_deref() {
            Ok("spin") => PollPolicy::Spin,
            Ok("yield") => PollPolicy::Yield,
            Ok("adaptive") | Err(_) => PollPolicy::Adaptive,
            Ok(other) => {
                eprintln!("machnet: MACHNET_POLL={other:?} is not spin, yield or adaptive; using adaptive");
                PollPolicy::Adaptive
            }
        })
    }
}

/// What went wrong. Small and `Copy`; `Display` gives a human-readable text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A system call failed with this errno (no daemon at the socket path: `ENOENT`/`ECONNREFUSED`).
    Os(i32),
    /// The daemon or engine answered with an error status.
    Daemon(Status),
    /// A reply or the channel region was malformed.
    Protocol,
    /// The daemon did not answer in time.
    TimedOut,
    /// Message length 0 or above 8 MiB, or scatter/gather lengths that do not add up.
    InvalidLength,
    /// An address that does not parse or is not allowed (0.0.0.0).
    InvalidAddress,
    /// The TX ring is full: retry after the engine catches up. Nothing was consumed.
    RingFull,
    /// Not enough free TX buffers: retry after the engine returns some. Nothing was consumed.
    NoBuffers,
    /// The receive buffer is smaller than the message (`needed` bytes); the message was discarded.
    TooSmall {
        /// Size of the discarded message.
        needed: usize,
    },
    /// The daemon let go of the channel (detached or shut down).
    Closed,
    /// The daemon is gone: its registration connection closed without a shutdown (it was
    /// killed or crashed). The channel is unusable; register again once a daemon runs.
    DaemonGone,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os(e) => write!(f, "{}", io::Error::from_raw_os_error(*e)),
            Error::Daemon(s) => write!(f, "daemon refused: {s}"),
            Error::Protocol => f.write_str("malformed reply or channel"),
            Error::TimedOut => f.write_str("timed out waiting for the daemon"),
            Error::InvalidLength => f.write_str("message length must be 1..=8388608 bytes"),
            Error::InvalidAddress => f.write_str("invalid IPv4 address"),
            Error::RingFull => f.write_str("transmit ring full"),
            Error::NoBuffers => f.write_str("no free transmit buffers"),
            Error::TooSmall { needed } => {
                write!(f, "receive buffer too small ({needed} bytes needed); message discarded")
            }
            Error::Closed => f.write_str("channel closed by the daemon"),
            Error::DaemonGone => f.write_str("the daemon is gone (its registration connection closed)"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut,
            _ => Error::Os(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Error {
        match e {
            CallError::Io(e) => e.into(),
            CallError::Protocol => Error::Protocol,
            CallError::Status(s) => Error::Daemon(s),
        }
    }
}

/// The process's registration with the daemon. Cheap to clone; the registration connection
/// closes (and the daemon reclaims everything) when the last clone and the last channel are
/// gone — or when the process dies.
#[derive(Clone, Debug)]
pub struct Machnet {
    conn: Arc<Mutex<CtrlClient>>,
    registration: ctrl::PeerCred,
    timeout: Duration,
}

impl Machnet {
    /// Registers with the daemon at `$MACHNET_CTRL_SOCK` (or the default path).
    pub fn init() -> Result<Machnet, Error> {
        Self::connect(&ctrl::socket_path())
    }

    /// Registers with the daemon listening at `path`.
    pub fn connect(path: &Path) -> Result<Machnet, Error> {
        Self::connect_with_timeout(path, DEFAULT_CTRL_TIMEOUT)
    }

    /// Registers with the daemon at `path`; socket replies and control requests of channels
    /// attached through this value may take at most `timeout`.
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Machnet, Error> {
        let mut c = CtrlClient::connect(path, timeout)?;
        let (m, _) = c.call(KIND_REGISTER, 0)?;
        let registration = ctrl::PeerCred { pid: m.pid, uid: m.uid, gid: m.gid };
        Ok(Machnet { conn: Arc::new(Mutex::new(c)), registration, timeout })
    }

    /// The process credentials the daemon recorded for this registration.
    pub fn registration(&self) -> ctrl::PeerCred {
        self.registration
    }

    /// The registration socket's descriptor.
    pub fn ctrl_fd(&self) -> RawFd {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).fd()
    }

    /// Asks the daemon for a new channel and maps it.
    pub fn attach(&self) -> Result<Channel, Error> {
        let (m, fds) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).call(KIND_CREATE_CHANNEL, 0)?;
        let [memfd, app_bell, engine_bell]: [OwnedFd; 3] = fds.try_into().map_err(|_| Error::Protocol)?;
        let mut ch = Channel::from_fds(AppFds { memfd, app_bell, engine_bell })?;
        ch.reg_fd = Some(self.conn.lock().unwrap_or_else(|e| e.into_inner()).fd());
        ch.owner = Some((self.conn.clone(), m.channel));
        ch.ctrl_timeout = self.timeout;
        Ok(ch)
    }
}

/// Application-side counters of one channel (also mirrored into the shared counters block).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Messages enqueued.
    pub tx_msgs: u64,
    /// Bytes enqueued.
    pub tx_bytes: u64,
    /// Sends refused: TX ring full.
    pub tx_ring_full: u64,
    /// Sends refused: no TX buffers.
    pub tx_no_bufs: u64,
    /// Messages received.
    pub rx_msgs: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Messages discarded: receive buffer too small.
    pub rx_too_small: u64,
    /// Events dropped because the local event queue was full.
    pub events_dropped: u64,
}

/// What an outside wait on the doorbell is for (besides the CQ, always watched).
#[cfg(feature = "tokio")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Watch {
    /// A received message.
    Rx,
    /// Only the CQ (a control completion or an event).
    Cq,
    /// TX buffers returned by the engine.
    TxBuffers,
    /// A free TX-ring slot.
    TxRing,
}

/// One attached channel. `Send`, not `Sync`.
pub struct Channel {
    region: Region,
    app_bell: Option<OwnedFd>,
    engine_bell: Option<OwnedFd>,
    tx: Producer<MsgDesc>,
    rx: Consumer<MsgDesc>,
    tx_ret: Consumer<u32>,
    rx_ret: Producer<u32>,
    sq: Producer<CtrlEntry>,
    cq: Consumer<CtrlEntry>,
    /// Free TX buffers (app-private).
    free: FreeList,
    /// Received buffers not yet handed back (only when the RX-return ring was short).
    rx_ret_pending: FreeList,
    events: VecDeque<Event>,
    next_id: u64,
    sleep_seq: u32,
    stats: ChannelStats,
    mss: usize,
    /// This process receives the engine's membarriers (see [`publish`]).
    cheap_wake: bool,
    ctrl_timeout: Duration,
    /// Ids of connects that timed out: a late success is closed, not left open unseen.
    abandoned: ArrayVec<u64, ABANDONED>,
    /// Flows from late connect completions, to close (sent as the SQ has room).
    late_close: ArrayVec<MachnetFlow, ABANDONED>,
    owner: Option<(Arc<Mutex<CtrlClient>>, u64)>,
    /// The registration socket, whose hang-up means the daemon died (`None` for a channel
    /// from [`Channel::bind`]). Stays open as long as `owner` holds the connection.
    reg_fd: Option<RawFd>,
    /// The registration socket hung up: the daemon is gone.
    daemon_gone: bool,
    /// When the registration socket is next looked at from a non-blocking call (coarse ns).
    next_alive_check: u64,
    /// What an empty non-blocking call does, and how many came in a row.
    poll: PollPolicy,
    idle_calls: u32,
    _not_sync: PhantomData<Cell<()>>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.region.name())
            .field("id", &self.owner.as_ref().map(|o| o.1))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Publishes what `p` wrote, for the engine-doorbell handshake: with `cheap` (this process is
/// registered for global membarriers, which the engine issues before it sleeps) a release store
/// and a compiler fence suffice; otherwise a sequentially consistent store pairs with the
/// engine's sequentially consistent announce-then-check.
#[inline]
fn publish<T: crate::ring::Slot>(p: &mut Producer<T>, cheap: bool) {
    if cheap {
        p.publish();
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        p.publish_seqcst();
    }
}

/// Reads the header and checks it describes a layout that fits in `len` bytes.
fn validate_header(h: &Header, len: usize) -> Result<Layout, Error> {
    if h.magic.load(Ordering::Acquire) != MAGIC || h.version.load(Ordering::Relaxed) != VERSION {
        return Err(Error::Protocol);
    }
    if h.header_len.load(Ordering::Relaxed) as usize != core::mem::size_of::<Header>() {
        return Err(Error::Protocol);
    }
    let r = |a: &std::sync::atomic::AtomicU32| a.load(Ordering::Relaxed);
    let cfg = ChannelConfig {
        mss: r(&h.mss),
        tx_bufs: r(&h.tx_bufs),
        rx_bufs: r(&h.rx_bufs),
        tx_ring: r(&h.tx_ring),
        rx_ring: r(&h.rx_ring),
        ctrl_ring: r(&h.ctrl_ring),
    };
    let lay = Layout::compute(&cfg).map_err(|_| Error::Protocol)?;
    let same = lay.buf_stride == r(&h.buf_stride) as usize
        && lay.buf_hdr_off == r(&h.buf_hdr_off) as usize
        && lay.tx_ret_ring == r(&h.tx_ret_ring)
        && lay.rx_ret_ring == r(&h.rx_ret_ring)
        && lay.total_len as u64 == h.total_len.load(Ordering::Relaxed)
        && lay.offsets.iter().zip(&h.offsets).all(|(a, b)| *a as u64 == b.load(Ordering::Relaxed));
    if !same || lay.total_len > len {
        return Err(Error::Protocol);
    }
    if h.state.load(Ordering::Acquire) != STATE_ALIVE {
        return Err(Error::Closed);
    }
    Ok(lay)
}

impl Channel {
    /// Maps a channel from its descriptors (as received from the daemon).
    pub fn from_fds(fds: AppFds) -> Result<Channel, Error> {
        Self::map(fds.memfd, Some(fds.app_bell), Some(fds.engine_bell))
    }

    /// Maps a channel memfd obtained some other way (the C `machnet_bind`). Without doorbells,
    /// blocking calls poll with short sleeps.
    pub fn bind(memfd: OwnedFd) -> Result<Channel, Error> {
        Self::map(memfd, None, None)
    }

    fn map(memfd: OwnedFd, app_bell: Option<OwnedFd>, engine_bell: Option<OwnedFd>) -> Result<Channel, Error> {
        let len = shm::file_len(memfd.as_fd())?;
        if len < core::mem::size_of::<Header>() {
            return Err(Error::Protocol);
        }
        let map = Mapping::map(memfd.as_fd(), len)?;
        drop(memfd);
        // SAFETY: the mapping is at least a header long, page-aligned; the header is atomics only.
        let lay = validate_header(unsafe { map.base().cast::<Header>().as_ref() }, len)?;
        let region = Region::new(map, lay);
        let cfg = lay.cfg;
        // SAFETY: the layout was validated against the mapping; each ring part holds its element
        // type and entry count; the handles have no drop glue and are stored next to the mapping
        // in the same struct; this channel holds the only app-side handles (one Channel per
        // region — binding a region twice breaks only the caller's own channel, not memory
        // safety, since every access stays inside the mapping and is atomic or a raw copy).
        let (tx, rx, tx_ret, rx_ret, sq, cq) = unsafe {
            (
                region.producer::<MsgDesc>(Part::TxRing, cfg.tx_ring),
                region.consumer::<MsgDesc>(Part::RxRing, cfg.rx_ring),
                region.consumer::<u32>(Part::TxRetRing, lay.tx_ret_ring),
                region.producer::<u32>(Part::RxRetRing, lay.rx_ret_ring),
                region.producer::<CtrlEntry>(Part::Sq, cfg.ctrl_ring),
                region.consumer::<CtrlEntry>(Part::Cq, cfg.ctrl_ring),
            )
        };
        let cheap_wake = shm::membarrier_register();
        region.bells().app.barrier.store(cheap_wake as u32, Ordering::SeqCst);
        Ok(Channel {
            region,
            app_bell,
            engine_bell,
            tx,
            rx,
            tx_ret,
            rx_ret,
            sq,
            cq,
            free: FreeList::full(cfg.tx_bufs),
            rx_ret_pending: FreeList::with_capacity(cfg.rx_bufs as usize),
            events: VecDeque::with_capacity(EVENT_QUEUE),
            next_id: 0,
            sleep_seq: 0,
            stats: ChannelStats::default(),
            mss: cfg.mss as usize,
            cheap_wake,
            ctrl_timeout: DEFAULT_CTRL_TIMEOUT,
            abandoned: ArrayVec::new(),
            late_close: ArrayVec::new(),
            owner: None,
            reg_fd: None,
            daemon_gone: false,
            next_alive_check: 0,
            poll: PollPolicy::from_env(),
            idle_calls: 0,
            _not_sync: PhantomData,
        })
    }

    /// The channel's layout (sizes from the daemon's configuration).
    pub fn layout(&self) -> &Layout {
        &self.region.lay
    }

    /// The daemon's id for this channel (`None` for a channel from [`Channel::bind`]).
    pub fn id(&self) -> Option<u64> {
        self.owner.as_ref().map(|o| o.1)
    }

    /// Sets the time control requests may take.
    pub fn set_ctrl_timeout(&mut self, t: Duration) {
        self.ctrl_timeout = t;
    }

    /// Application-side counters.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Whether the daemon let go of this channel, or is gone.
    pub fn is_closed(&self) -> bool {
        self.daemon_gone || self.region.header().state.load(Ordering::Acquire) != STATE_ALIVE
    }

    /// Why the channel is unusable, if it is: `Closed` (detached, the daemon shut down) or
    /// `DaemonGone` (the daemon died).
    fn closed_error(&self) -> Option<Error> {
        if self.daemon_gone {
            Some(Error::DaemonGone)
        } else if self.region.header().state.load(Ordering::Acquire) != STATE_ALIVE {
            Some(Error::Closed)
        } else {
            None
        }
    }

    /// Looks at the registration socket (at most every [`ALIVE_CHECK_NS`] unless `now`):
    /// `Err(DaemonGone)` once the daemon died. A daemon that shuts down cleanly marks the
    /// channel closed instead; one that is killed leaves only this hang-up behind.
    fn check_alive(&mut self, now: bool) -> Result<(), Error> {
        if self.daemon_gone {
            return Err(Error::DaemonGone);
        }
        let Some(fd) = self.reg_fd else { return Ok(()) };
        let t = shm::coarse_ns();
        if !now && t < self.next_alive_check {
            return Ok(());
        }
        self.next_alive_check = t + ALIVE_CHECK_NS;
        if shm::hung_up(fd) {
            self.daemon_gone = true;
            return Err(Error::DaemonGone);
        }
        Ok(())
    }

    /// Bytes mapped (the whole memfd).
    pub fn mapped_len(&self) -> usize {
        self.region.mapped_len()
    }

    /// Free TX buffers, after taking back those the engine returned.
    pub fn tx_free_buffers(&mut self) -> usize {
        self.refill_tx();
        self.free.len()
    }

    // --- Send ---------------------------------------------------------------------------------

    /// Sends `data` on `flow` (src = local end). Returns once the message is queued; says
    /// nothing about delivery. Never blocks, never allocates; on error nothing was consumed.
    #[inline]
    pub fn send(&mut self, flow: MachnetFlow, data: &[u8]) -> Result<(), Error> {
        self.send_segs(flow, data.len(), std::iter::once(data), 0)
    }

    /// Sends the concatenation of `iov` as one message (scatter-gather; zero-length slices
    /// are fine). `flags`: `MSG_FLAG_*` bits.
    pub fn sendmsg(&mut self, flow: MachnetFlow, iov: &[IoSlice<'_>], flags: u32) -> Result<(), Error> {
        let len = iov.iter().map(|s| s.len()).sum();
        self.send_segs(flow, len, iov.iter().map(|s| &**s), flags)
    }

    /// Sends `len` bytes taken from `segs` in order. `len` must equal the sum of the segment
    /// lengths (checked while copying; a mismatch is `InvalidLength` with nothing consumed).
    pub(crate) fn send_segs<'a>(
        &mut self,
        flow: MachnetFlow,
        len: usize,
        segs: impl Iterator<Item = &'a [u8]> + Clone,
        flags: u32,
    ) -> Result<(), Error> {
        if len == 0 || len > MSG_MAX_LEN {
            return Err(Error::InvalidLength);
        }
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        // A killed daemon leaves the rings as they were: sends would succeed until they fill.
        self.check_alive(false)?;
        let count = len.div_ceil(self.mss);
        match self.tx.free(1) {
            Ok(0) => {
                self.check_alive(true)?;
                self.after_poll(true);
                self.stats.tx_ring_full += 1;
                set(&self.region.counters().app.tx_ring_full, self.stats.tx_ring_full);
                return Err(Error::RingFull);
            }
            Ok(_) => {}
            Err(Corrupt) => return Err(Error::Protocol),
        }
        if self.free.len() < count {
            self.refill_tx();
            if self.free.len() < count {
                self.check_alive(true)?;
                self.after_poll(true);
                self.stats.tx_no_bufs += 1;
                set(&self.region.counters().app.tx_no_bufs, self.stats.tx_no_bufs);
                return Err(Error::NoBuffers);
            }
        }
        // Fill buffers from the top of the free list without popping, so a length mismatch
        // can back out with nothing consumed.
        let bufs = self.free.top(count);
        let mut segs = segs;
        let mut cur: &[u8] = &[];
        let mut remaining = len;
        for (k, &idx) in bufs.iter().rev().enumerate() {
            let n = remaining.min(self.mss);
            let dst = self.region.payload(Part::TxPool, idx);
            let mut filled = 0;
            while filled < n {
                if cur.is_empty() {
                    match segs.next() {
                        Some(s) => cur = s,
                        None => return Err(Error::InvalidLength),
                    }
                    continue;
                }
                let m = cur.len().min(n - filled);
                // SAFETY: `idx` is a free TX buffer (< tx_bufs) and filled + m <= n <= mss, so the
                // destination is inside its payload; shared memory is written through a raw
                // pointer only; the source is the caller's slice.
                unsafe { core::ptr::copy_nonoverlapping(cur.as_ptr(), dst.add(filled), m) };
                filled += m;
                cur = &cur[m..];
            }
            remaining -= n;
            if count > 1 {
                // Chains only: a single-buffer message is described by its descriptor alone.
                let h = self.region.buf_hdr(Part::TxPool, idx);
                h.len.store(n as u32, Ordering::Relaxed);
                let next = if k + 1 < count { bufs[count - 2 - k] } else { NIL };
                h.next.store(next, Ordering::Relaxed);
            }
        }
        if !cur.is_empty() || segs.any(|s| !s.is_empty()) {
            return Err(Error::InvalidLength);
        }
        let head = bufs[count - 1];
        let kept = self.free.len() - count;
        self.free.truncate(kept);
        let d = MsgDesc { flow, head, count: count as u32, len: len as u32, flags, reserved: 0 };
        let wrote = self.tx.write(d);
        debug_assert_eq!(wrote, Ok(true));
        publish(&mut self.tx, self.cheap_wake);
        self.wake_engine();
        self.idle_calls = 0;
        self.stats.tx_msgs += 1;
        self.stats.tx_bytes += len as u64;
        let c = &self.region.counters().app;
        set(&c.tx_msgs, self.stats.tx_msgs);
        set(&c.tx_bytes, self.stats.tx_bytes);
        Ok(())
    }

    /// Takes back TX buffers the engine returned.
    fn refill_tx(&mut self) {
        let n_tx = self.region.lay.cfg.tx_bufs;
        let mut batch = [0u32; 64];
        loop {
            let Ok(n) = self.tx_ret.read_batch(&mut batch) else { return };
            self.tx_ret.release();
            for &idx in &batch[..n] {
                // A buggy engine could return garbage; keep only what can be a buffer.
                if idx < n_tx {
                    let _ = self.free.push(idx);
                }
            }
            if n < batch.len() {
                return;
            }
        }
    }

    /// Rings the engine's doorbell if it announced a sleep. Runs right after a [`publish`]:
    /// either the engine's re-check sees the publication or this load sees its announcement.
    #[inline]
    fn wake_engine(&self) {
        let order = if self.cheap_wake { Ordering::Relaxed } else { Ordering::SeqCst };
        if self.region.bells().engine.word.load(order) != 0 {
            if let Some(b) = &self.engine_bell {
                shm::ring(b.as_fd());
            }
        }
    }

    // --- Receive ------------------------------------------------------------------------------

    /// Receives one message into `buf`. `Ok(None)` when nothing is pending (after giving the
    /// CPU away if the [`PollPolicy`] says so); `Err(TooSmall)` when `buf` is shorter than the
    /// message, which is then discarded (its buffers go back to the engine). Returns the length
    /// and the flow (src = remote sender, dst = local; reply on `flow.reversed()`).
    #[inline]
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let cap = buf.len();
        let r = self.recv_segs(cap, std::iter::once(buf));
        self.after_poll(matches!(r, Ok(None)));
        r
    }

    /// Receives one message scattered over `iov` (zero-length slices are skipped).
    pub fn recvmsg(&mut self, iov: &mut [IoSliceMut<'_>]) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let cap = iov.iter().map(|s| s.len()).sum();
        let r = self.recv_segs(cap, iov.iter_mut().map(|s| &mut **s));
        self.after_poll(matches!(r, Ok(None)));
        r
    }

    /// Counts a non-blocking call that found nothing to do (`idle`) or something, and gives the
    /// CPU away as the [`PollPolicy`] says.
    #[inline]
    pub(crate) fn after_poll(&mut self, idle: bool) {
        if !idle {
            self.idle_calls = 0;
            return;
        }
        self.idle_calls = self.idle_calls.saturating_add(1);
        let give_away = match self.poll {
            PollPolicy::Spin => false,
            PollPolicy::Yield => true,
            PollPolicy::Adaptive => self.idle_calls > ADAPTIVE_SPIN,
        };
        if give_away {
            std::thread::yield_now();
        }
    }

    /// The policy of this channel (from `MACHNET_POLL`).
    pub fn poll_policy(&self) -> PollPolicy {
        self.poll
    }

    /// Sets the policy of this channel.
    pub fn set_poll_policy(&mut self, p: PollPolicy) {
        self.poll = p;
    }

    /// Receives into `segs` (total capacity `cap`).
    pub(crate) fn recv_segs<'a>(
        &mut self,
        cap: usize,
        segs: impl Iterator<Item = &'a mut [u8]>,
    ) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let d = match self.rx.read() {
            Ok(Some(d)) => d,
            Ok(None) => {
                // Nothing for us: is there still a daemon that could send something?
                if let Some(e) = self.closed_error() {
                    return Err(e);
                }
                self.check_alive(false)?;
                return Ok(None);
            }
            Err(Corrupt) => return Err(Error::Protocol),
        };
        let len = d.len as usize;
        let n_rx = self.region.lay.cfg.rx_bufs;
        if d.count == 0 || d.count > n_rx || len > MSG_MAX_LEN {
            self.rx.release();
            return Err(Error::Protocol);
        }
        if len > cap {
            self.give_back(d.head, d.count);
            self.rx.release();
            self.stats.rx_too_small += 1;
            set(&self.region.counters().app.rx_too_small, self.stats.rx_too_small);
            return Err(Error::TooSmall { needed: len });
        }
        let mut segs = segs;
        let mut cur: &mut [u8] = &mut [];
        let mut idx = d.head;
        let mut copied = 0usize;
        let mut ok = true;
        for _ in 0..d.count {
            if idx >= n_rx {
                ok = false;
                break;
            }
            let (seg, next) = if d.count == 1 {
                (len.min(self.mss), NIL)
            } else {
                let h = self.region.buf_hdr(Part::RxPool, idx);
                (
                    (h.len.load(Ordering::Relaxed) as usize).min(self.mss).min(len - copied),
                    h.next.load(Ordering::Relaxed),
                )
            };
            let src = self.region.payload(Part::RxPool, idx);
            let mut off = 0;
            while off < seg {
                if cur.is_empty() {
                    match segs.next() {
                        Some(s) => cur = s,
                        None => break,
                    }
                    continue;
                }
                let m = cur.len().min(seg - off);
                // SAFETY: idx < rx_bufs and off + m <= seg <= mss: inside the buffer's payload;
                // shared memory is read through a raw pointer into the caller's private slice.
                unsafe { core::ptr::copy_nonoverlapping(src.add(off), cur.as_mut_ptr(), m) };
                off += m;
                cur = &mut std::mem::take(&mut cur)[m..];
            }
            copied += off;
            self.return_rx(idx);
            idx = next;
        }
        self.flush_rx_returns();
        self.rx.release();
        if !ok || copied != len {
            return Err(Error::Protocol);
        }
        self.stats.rx_msgs += 1;
        self.stats.rx_bytes += len as u64;
        let c = &self.region.counters().app;
        set(&c.rx_msgs, self.stats.rx_msgs);
        set(&c.rx_bytes, self.stats.rx_bytes);
        Ok(Some((len, d.flow)))
    }

    /// Returns a whole chain to the engine without reading it.
    fn give_back(&mut self, head: u32, count: u32) {
        let n_rx = self.region.lay.cfg.rx_bufs;
        let mut idx = head;
        for _ in 0..count {
            if idx >= n_rx {
                break;
            }
            let next =
                if count == 1 { NIL } else { self.region.buf_hdr(Part::RxPool, idx).next.load(Ordering::Relaxed) };
            self.return_rx(idx);
            idx = next;
        }
        self.flush_rx_returns();
    }

    #[inline]
    fn return_rx(&mut self, idx: u32) {
        // The return ring holds the whole pool, so it is short only if the engine stopped
        // reading it; keep the rest privately then.
        if !matches!(self.rx_ret.write(idx), Ok(true)) {
            let _ = self.rx_ret_pending.push(idx);
        }
    }

    fn flush_rx_returns(&mut self) {
        while let Some(idx) = self.rx_ret_pending.pop() {
            if !matches!(self.rx_ret.write(idx), Ok(true)) {
                let _ = self.rx_ret_pending.push(idx);
                break;
            }
        }
        if self.rx_ret.unpublished() > 0 {
            publish(&mut self.rx_ret, self.cheap_wake);
            self.wake_engine();
        }
    }

    /// As [`Channel::recv`], waiting up to `timeout` (`None` = forever) for a message: spins
    /// briefly, then sleeps on the channel's doorbell. `Ok(None)` on timeout.
    pub fn recv_blocking(
        &mut self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let cap = buf.len();
        loop {
            if let Some(r) = self.recv_segs(cap, std::iter::once(&mut *buf))? {
                return Ok(Some(r));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            self.wait_until(deadline)?;
        }
    }

    /// As [`Channel::recvmsg`], waiting up to `timeout`.
    pub fn recvmsg_blocking(
        &mut self,
        iov: &mut [IoSliceMut<'_>],
        timeout: Option<Duration>,
    ) -> Result<Option<(usize, MachnetFlow)>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let cap = iov.iter().map(|s| s.len()).sum();
        loop {
            if let Some(r) = self.recv_segs(cap, iov.iter_mut().map(|s| &mut **s))? {
                return Ok(Some(r));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            self.wait_until(deadline)?;
        }
    }

    /// Waits (spinning briefly, then on the doorbell) until a message may be pending, or
    /// `timeout` passes (`None`: at most 100 ms at a time). Consumes nothing; for callers that
    /// receive with [`Channel::recvmsg`] and decide their buffers per message.
    /// `Err(Closed)` if the daemon let go of the channel.
    pub fn wait_rx(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.wait_until(timeout.and_then(|t| Instant::now().checked_add(t)))
    }

    pub(crate) fn wait_until(&mut self, deadline: Option<Instant>) -> Result<(), Error> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        // Unsolicited events (a flow closed by its peer, ...) wait in the local queue for
        // `poll_event`; left in the CQ they would count as pending work and the sleep below
        // would return at once, forever: a receive loop would spin at 100% CPU.
        self.drain_cq(0)?;
        for _ in 0..SPIN_POLLS {
            if self.rx.available(1).unwrap_or(1) > 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        self.sleep(deadline, true)
    }

    /// Sleeps on the doorbell until the RX ring (if `watch_rx`) or the CQ has something, the
    /// deadline passes, or 100 ms (to re-check for a dead channel). The handshake: announce
    /// the sleep (odd sequence, SeqCst), re-check the rings (SeqCst), then wait; the engine
    /// publishes (SeqCst) before it reads the sequence, so one of the two sees the other.
    fn sleep(&mut self, deadline: Option<Instant>, watch_rx: bool) -> Result<(), Error> {
        let now = Instant::now();
        let mut wait = Duration::from_millis(100);
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let Some(bell) = &self.app_bell else {
            std::thread::sleep(wait.min(Duration::from_micros(50)));
            return Ok(());
        };
        let word = &self.region.bells().app.word;
        self.sleep_seq = self.sleep_seq.wrapping_add(1) | 1;
        word.store(self.sleep_seq, Ordering::SeqCst);
        let pending = self.cq.has_pending_seqcst() || (watch_rx && self.rx.has_pending_seqcst());
        let mut gone = false;
        if !pending {
            // The registration socket is watched too: a daemon that dies wakes us.
            gone = match self.reg_fd {
                Some(reg) => shm::wait_readable_or_hangup(bell.as_fd(), reg, Some(wait)).unwrap_or(false),
                None => {
                    let _ = shm::wait_readable(bell.as_fd(), Some(wait));
                    false
                }
            };
        }
        self.sleep_seq = self.sleep_seq.wrapping_add(1);
        word.store(self.sleep_seq, Ordering::SeqCst);
        shm::drain(bell.as_fd());
        if gone {
            self.daemon_gone = true;
            return Err(Error::DaemonGone);
        }
        Ok(())
    }

    // --- Waiting from outside (the asynchronous channel, `crate::asyncio`) --------------------

    /// The doorbell the engine rings while this side announces a wait (`None` for a channel
    /// from [`Channel::bind`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn app_bell(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.app_bell.as_ref().map(|b| b.as_fd())
    }

    /// A duplicate of the registration socket's descriptor, to watch for the daemon's death.
    #[cfg(feature = "tokio")]
    pub(crate) fn registration_dup(&self) -> Option<io::Result<OwnedFd>> {
        // SAFETY: `reg_fd` stays open as long as `owner` holds the registration connection,
        // which this channel does while it is borrowed here; the duplicate is independent.
        self.reg_fd.map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned())
    }

    /// Looks at the registration socket now: `Err(DaemonGone)` once the daemon died.
    #[cfg(feature = "tokio")]
    pub(crate) fn check_daemon(&mut self) -> Result<(), Error> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        self.check_alive(true)
    }

    /// Announces a wait on the doorbell for `w` and re-checks (sequentially consistent, the
    /// other half of the engine's publish-then-look): true if something is already there, and
    /// the caller must not wait. Every call is followed by [`end_wait`](Self::end_wait).
    #[cfg(feature = "tokio")]
    pub(crate) fn begin_wait(&mut self, w: Watch) -> bool {
        let bells = self.region.bells();
        let tx = matches!(w, Watch::TxBuffers | Watch::TxRing);
        if tx {
            bells.app.want_tx.store(1, Ordering::SeqCst);
        }
        self.sleep_seq = self.sleep_seq.wrapping_add(1) | 1;
        bells.app.word.store(self.sleep_seq, Ordering::SeqCst);
        self.cq.has_pending_seqcst()
            || match w {
                Watch::Rx => self.rx.has_pending_seqcst(),
                Watch::Cq => false,
                Watch::TxBuffers => self.tx_ret.has_pending_seqcst(),
                Watch::TxRing => self.tx.has_room_seqcst(),
            }
    }

    /// Ends a wait begun with [`begin_wait`](Self::begin_wait): clears the announcement and the
    /// doorbell.
    #[cfg(feature = "tokio")]
    pub(crate) fn end_wait(&mut self) {
        let bells = self.region.bells();
        self.sleep_seq = self.sleep_seq.wrapping_add(1);
        bells.app.word.store(self.sleep_seq, Ordering::SeqCst);
        bells.app.want_tx.store(0, Ordering::Relaxed);
        if let Some(b) = &self.app_bell {
            shm::drain(b.as_fd());
        }
    }

    /// Moves unsolicited events from the CQ to the local queue (so the CQ does not read as
    /// pending work), and whether any event is queued.
    #[cfg(feature = "tokio")]
    pub(crate) fn queue_events(&mut self) -> Result<bool, Error> {
        self.drain_cq(0)?;
        Ok(!self.events.is_empty())
    }

    /// Posts control request `op` without waiting: its id, or `None` if the SQ is full.
    #[cfg(feature = "tokio")]
    pub(crate) fn ctrl_submit(&mut self, op: CtrlOp) -> Result<Option<u64>, Error> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        self.next_id += 1;
        let id = self.next_id;
        match self.sq.write(op.encode(id)) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(Corrupt) => return Err(Error::Protocol),
        }
        publish(&mut self.sq, self.cheap_wake);
        self.wake_engine();
        Ok(Some(id))
    }

    /// The completion of request `id`, if it has come (events met on the way are queued).
    #[cfg(feature = "tokio")]
    pub(crate) fn ctrl_poll(&mut self, id: u64) -> Result<Option<Result<MachnetFlow, Status>>, Error> {
        if let Some(r) = self.drain_cq(id)? {
            return Ok(Some(r));
        }
        self.closed_error().map_or(Ok(None), Err)
    }

    /// Gives up on connect `id` (timed out or cancelled): a late success is closed.
    #[cfg(feature = "tokio")]
    pub(crate) fn ctrl_abandon(&mut self, id: u64) {
        if self.abandoned.is_full() {
            self.abandoned.remove(0);
        }
        self.abandoned.push(id);
    }

    /// The time control requests may take.
    pub fn ctrl_timeout(&self) -> Duration {
        self.ctrl_timeout
    }

    // --- Control ------------------------------------------------------------------------------

    fn ctrl_call(&mut self, op: CtrlOp) -> Result<MachnetFlow, Error> {
        self.next_id += 1;
        let id = self.next_id;
        // A timeout too long to represent waits a year (as good as forever).
        let now = Instant::now();
        let deadline = now.checked_add(self.ctrl_timeout).unwrap_or(now + Duration::from_secs(365 * 86_400));
        loop {
            match self.sq.write(op.encode(id)) {
                Ok(true) => break,
                Ok(false) => {}
                Err(Corrupt) => return Err(Error::Protocol),
            }
            self.drain_cq(0)?;
            self.ctrl_wait(deadline)?;
        }
        publish(&mut self.sq, self.cheap_wake);
        self.wake_engine();
        loop {
            if let Some(r) = self.drain_cq(id)? {
                return r.map_err(Error::Daemon);
            }
            if let Err(e) = self.ctrl_wait(deadline) {
                if matches!(op, CtrlOp::Connect { .. }) {
                    // The daemon may still open the flow; the application was told it failed.
                    if self.abandoned.is_full() {
                        self.abandoned.remove(0);
                    }
                    self.abandoned.push(id);
                }
                return Err(e);
            }
        }
    }

    /// Asks the daemon to close flows opened by connects this application gave up on.
    /// Fire-and-forget: their completions are dropped like any stale one.
    fn close_late_flows(&mut self) {
        let mut sent = false;
        while let Some(&flow) = self.late_close.last() {
            self.next_id += 1;
            match self.sq.write(CtrlOp::Close { flow }.encode(self.next_id)) {
                Ok(true) => {
                    self.late_close.pop();
                    sent = true;
                }
                _ => break, // full (retried on the next drain) or corrupt (reported elsewhere)
            }
        }
        if sent {
            publish(&mut self.sq, self.cheap_wake);
            self.wake_engine();
        }
    }

    fn ctrl_wait(&mut self, deadline: Instant) -> Result<(), Error> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(Error::TimedOut);
        }
        for _ in 0..SPIN_POLLS {
            if self.cq.available(1).unwrap_or(1) > 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        // Only the CQ: unread messages must not keep a control call from sleeping.
        self.sleep(Some(deadline), false)
    }

    /// Reads the CQ: queues events, drops stale completions (closing flows of abandoned
    /// connects), returns the completion of `want`.
    fn drain_cq(&mut self, want: u64) -> Result<Option<Result<MachnetFlow, Status>>, Error> {
        let mut popped = false;
        let r = self.drain_cq_inner(want, &mut popped);
        if popped {
            // The engine may hold completions that did not fit; a parked engine learns of the
            // room only from its doorbell.
            self.wake_engine();
        }
        r
    }

    fn drain_cq_inner(&mut self, want: u64, popped: &mut bool) -> Result<Option<Result<MachnetFlow, Status>>, Error> {
        loop {
            let e = match self.cq.pop() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    if !self.late_close.is_empty() {
                        self.close_late_flows();
                    }
                    return Ok(None);
                }
                Err(Corrupt) => return Err(Error::Protocol),
            };
            *popped = true;
            match Completion::decode(&e) {
                Completion::Done { id, result } if id == want && want != 0 => return Ok(Some(result)),
                Completion::Done { id, result } => {
                    // A late answer to a request that timed out; a connect that succeeded
                    // after all is closed.
                    if let Some(k) = self.abandoned.iter().position(|&a| a == id) {
                        self.abandoned.remove(k);
                        if let Ok(flow) = result {
                            if self.late_close.try_push(flow).is_err() {
                                self.stats.events_dropped += 1;
                            }
                        }
                    }
                }
                Completion::Event(ev) => {
                    if self.events.len() == EVENT_QUEUE {
                        self.events.pop_front();
                        self.stats.events_dropped += 1;
                    }
                    self.events.push_back(ev);
                }
            }
        }
    }

    /// Listens on `ip:port`. After `Err(TimedOut)` the daemon may still complete the listen
    /// (the port then reads as taken: a retry gets `AddrInUse`).
    pub fn listen(&mut self, ip: Ipv4Addr, port: u16) -> Result<(), Error> {
        self.ctrl_call(CtrlOp::Listen { ip, port }).map(|_| ())
    }

    /// Connects `local_ip` to `remote_ip:remote_port`; returns the flow to send on
    /// (src = local with the daemon's chosen port). After `Err(TimedOut)`, a flow the daemon
    /// opens late is closed again (the client remembers its last 16 abandoned connects).
    pub fn connect(&mut self, local_ip: Ipv4Addr, remote_ip: Ipv4Addr, remote_port: u16) -> Result<MachnetFlow, Error> {
        if remote_ip.is_unspecified() || remote_ip.is_broadcast() {
            return Err(Error::InvalidAddress);
        }
        self.ctrl_call(CtrlOp::Connect { local_ip, remote_ip, remote_port })
    }

    /// Closes a flow this channel owns (as the application sends on it).
    pub fn close(&mut self, flow: MachnetFlow) -> Result<(), Error> {
        self.ctrl_call(CtrlOp::Close { flow }).map(|_| ())
    }

    /// The next unsolicited event (flow closed by the peer, flow failed, message refused, ...).
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            let _ = self.drain_cq(0);
        }
        self.events.pop_front()
    }

    /// Detaches: the daemon destroys the channel and takes its buffers back.
    pub fn detach(mut self) -> Result<(), Error> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), Error> {
        let Some((conn, id)) = self.owner.take() else { return Ok(()) };
        if self.daemon_gone {
            return Err(Error::DaemonGone);
        }
        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
        c.call(KIND_DETACH_CHANNEL, id)?;
        Ok(())
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let _ = self.detach_inner();
    }
}
