//! The shared-memory layout of one channel: a `#[repr(C)]` header, counters, doorbell sleep
//! flags, six SPSC rings and two buffer pools, all at offsets computed from a
//! [`ChannelConfig`] by the `const fn` [`Layout::compute`].
//!
//! ```text
//! offset 0     Header            256 B   magic, version, sizes, every offset (written once by the engine)
//!              Counters          128 B   engine line + app line (statistics only, never trusted)
//!              Bells             128 B   app sleep sequence + engine sleep flag, one cache line each
//!              TX ring           app → engine   MsgDesc     (tx_ring entries)
//!              RX ring           engine → app   MsgDesc     (rx_ring entries)
//!              TX-return ring    engine → app   u32 buffer  (next_pow2(tx_bufs) entries)
//!              RX-return ring    app → engine   u32 buffer  (next_pow2(rx_bufs) entries)
//!              control SQ        app → engine   CtrlEntry   (ctrl_ring entries)
//!              control CQ        engine → app   CtrlEntry   (ctrl_ring entries)
//! page-aligned TX pool           tx_bufs × stride   (mss payload, then BufHdr 16 B; stride 64-aligned)
//! page-aligned RX pool           rx_bufs × stride
//! ```
//!
//! Every ring is a 128-byte header (producer index on one cache line, consumer index on the
//! next) followed by its slots. Every field of every shared struct is an atomic integer, so both
//! sides may hold references to them while the other process writes; descriptors are copied in
//! and out word by word with atomic loads and stores (see [`crate::ring::Slot`]).
//!
//! The defaults hold two 8 MiB messages in flight in each direction:
//! `12288 × 1418 B = 17.4 MB ≥ 2 × 8 MiB`.

use core::mem::{align_of, offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicU64};
use std::fmt;
use std::net::Ipv4Addr;

use static_assertions::{const_assert, const_assert_eq};

/// Largest message an application may send or receive (8 MiB, as in the original).
pub const MSG_MAX_LEN: usize = 8 * 1024 * 1024;
/// Default payload bytes per buffer: 1500 − 20 (IPv4) − 8 (UDP) − 54 (Machnet header).
pub const DEFAULT_MSS: u32 = 1418;
/// `Header::magic`: the ASCII bytes `MACHNETC` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MACHNETC");
/// Layout version; bumped on every incompatible change.
pub const VERSION: u32 = 1;
/// "No buffer": the `next` link of the last buffer of a chain.
pub const NIL: u32 = u32::MAX;
/// Cache line size assumed for padding.
pub const CACHE_LINE: usize = 64;
/// Alignment of the buffer pools.
pub const PAGE: usize = 4096;
/// Size of the per-buffer header ([`BufHdr`]), placed after the payload in each slot.
pub const BUF_HDR_LEN: usize = 16;
/// Size of a ring header (producer line + consumer line).
pub const RING_HDR_LEN: usize = 128;
/// Byte offset of the producer index inside a ring header.
pub const RING_PROD_OFF: usize = 0;
/// Byte offset of the consumer index inside a ring header.
pub const RING_CONS_OFF: usize = 64;
/// Message flag: ask for a delivery notification (propagated, not acted upon; as the original).
pub const MSG_FLAG_NOTIFY_DELIVERY: u32 = 0x80;
/// Message flags the engine accepts from an application; others are cleared.
pub const MSG_FLAGS_ACCEPTED: u32 = MSG_FLAG_NOTIFY_DELIVERY;

/// `Header::state`: the engine serves the channel.
pub const STATE_ALIVE: u32 = 1;
/// `Header::state`: the engine has let go of the channel (detached, app reclaimed, or shut down).
pub const STATE_DEAD: u32 = 2;

/// A connection identity from the caller's point of view; addresses and ports in host byte
/// order (10.0.0.1 = `0x0A00_0001`). Layout-identical to the C `MachnetFlow_t` (12 bytes).
///
/// Sending: `src` is the local end, `dst` the remote one. Receiving: `src` is the remote
/// sender and `dst` the local end; reply on [`MachnetFlow::reversed`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachnetFlow {
    /// Source IPv4 address, host byte order.
    pub src_ip: u32,
    /// Destination IPv4 address, host byte order.
    pub dst_ip: u32,
    /// Source UDP port.
    pub src_port: u16,
    /// Destination UDP port.
    pub dst_port: u16,
}

impl MachnetFlow {
    /// A flow from `src:src_port` to `dst:dst_port`.
    pub const fn new(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        MachnetFlow { src_ip: src.to_bits(), dst_ip: dst.to_bits(), src_port, dst_port }
    }
    /// The same connection seen from the other end.
    pub const fn reversed(self) -> Self {
        MachnetFlow { src_ip: self.dst_ip, dst_ip: self.src_ip, src_port: self.dst_port, dst_port: self.src_port }
    }
    /// Source address.
    pub const fn src_addr(self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.src_ip)
    }
    /// Destination address.
    pub const fn dst_addr(self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.dst_ip)
    }
}

impl fmt::Display for MachnetFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} -> {}:{}", self.src_addr(), self.src_port, self.dst_addr(), self.dst_port)
    }
}

/// A message descriptor on the TX ring (app → engine) and the RX ring (engine → app).
///
/// `head` is the first buffer of a chain of `count` buffers linked through [`BufHdr::next`];
/// `len` is the total payload. Every buffer but the last carries exactly `mss` bytes on TX.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgDesc {
    /// TX: the sending flow (src = local). RX: src = remote sender, dst = local.
    pub flow: MachnetFlow,
    /// First buffer index.
    pub head: u32,
    /// Number of buffers in the chain.
    pub count: u32,
    /// Total message length in bytes, 1..=[`MSG_MAX_LEN`].
    pub len: u32,
    /// `MSG_FLAG_*` bits.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

/// A control submission (app → engine) or completion/event (engine → app) entry.
///
/// Requests carry a non-zero `id`; the completion echoes it. Unsolicited events use `id = 0`.
/// See [`crate::ops::CtrlOp`] and [`crate::ops::Event`] for the encodings of `op`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlEntry {
    /// Request id (non-zero) or 0 for an event.
    pub id: u64,
    /// Request opcode, [`OP_COMPLETE`], or an event kind.
    pub op: u32,
    /// Completion/event status ([`crate::Status`] code); 0 in requests.
    pub status: u32,
    /// Request argument or result flow.
    pub flow: MachnetFlow,
    /// Extra argument (event detail).
    pub aux: u32,
}

/// Control opcode: listen on `flow.src_ip:flow.src_port`.
pub const OP_LISTEN: u32 = 1;
/// Control opcode: connect `flow.src_ip` → `flow.dst_ip:flow.dst_port` (src_port ignored).
pub const OP_CONNECT: u32 = 2;
/// Control opcode: close `flow`.
pub const OP_CLOSE: u32 = 3;
/// `CtrlEntry::op` of a completion.
pub const OP_COMPLETE: u32 = 0x100;
/// `CtrlEntry::op` base of events: `OP_EVENT | kind`.
pub const OP_EVENT: u32 = 0x200;

/// The 16-byte header of every buffer slot, at [`Layout::buf_hdr_off`] after the payload (which
/// starts the slot, cache-line aligned). Used only by messages of more than one buffer: a
/// single-buffer message is described entirely by its descriptor, so the small-message path
/// touches one payload line per 64 bytes and no header.
#[repr(C)]
pub struct BufHdr {
    /// Next buffer of the same message, or [`NIL`].
    pub next: AtomicU32,
    /// Payload bytes in this buffer.
    pub len: AtomicU32,
    /// Zero.
    pub reserved: [AtomicU32; 2],
}

/// Channel header at offset 0. Written by the engine before the fd is handed out; `magic` is
/// stored last with release ordering. The engine never reads it back (it keeps its own
/// [`Layout`]); the application validates it against [`Layout::compute`].
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// `size_of::<Header>()`.
    pub header_len: AtomicU32,
    /// Bytes of the layout (the memfd may be larger, rounded to the page size used).
    pub total_len: AtomicU64,
    /// [`STATE_ALIVE`] or [`STATE_DEAD`].
    pub state: AtomicU32,
    /// Bit 0: doorbell eventfds accompany the channel.
    pub flags: AtomicU32,
    /// Payload bytes per buffer.
    pub mss: AtomicU32,
    /// Distance between buffer slots.
    pub buf_stride: AtomicU32,
    /// TX pool buffers.
    pub tx_bufs: AtomicU32,
    /// RX pool buffers.
    pub rx_bufs: AtomicU32,
    /// TX ring entries.
    pub tx_ring: AtomicU32,
    /// RX ring entries.
    pub rx_ring: AtomicU32,
    /// TX-return ring entries.
    pub tx_ret_ring: AtomicU32,
    /// RX-return ring entries.
    pub rx_ret_ring: AtomicU32,
    /// Control SQ and CQ entries (each).
    pub ctrl_ring: AtomicU32,
    /// Offset of the [`BufHdr`] inside a buffer slot.
    pub buf_hdr_off: AtomicU32,
    /// Offsets from the start of the region, in [`Part`] order.
    pub offsets: [AtomicU64; Part::COUNT],
    /// NUL-padded channel name (32 bytes).
    pub name: [AtomicU64; 4],
    /// Zero.
    pub reserved1: [AtomicU64; 9],
}

/// Header `flags` bit: doorbells are present.
pub const HDR_FLAG_DOORBELLS: u32 = 1;

/// Counters written by the engine (one cache line). Statistics only: nobody acts on them.
#[repr(C, align(64))]
pub struct EngineCounters {
    /// Messages accepted from the TX ring.
    pub tx_msgs: AtomicU64,
    /// Bytes accepted from the TX ring.
    pub tx_bytes: AtomicU64,
    /// Messages delivered on the RX ring.
    pub rx_msgs: AtomicU64,
    /// Bytes delivered on the RX ring.
    pub rx_bytes: AtomicU64,
    /// Deliveries refused because the RX ring was full (back-pressure).
    pub rx_full: AtomicU64,
    /// Protocol violations by the application (all reasons).
    pub violations: AtomicU64,
    /// Messages refused by the flow-ownership hook.
    pub refused: AtomicU64,
    /// Events dropped because the CQ and the overflow queue were full.
    pub events_dropped: AtomicU64,
}

/// Counters written by the application (one cache line). Never trusted by the engine.
#[repr(C, align(64))]
pub struct AppCounters {
    /// Messages enqueued on the TX ring.
    pub tx_msgs: AtomicU64,
    /// Bytes enqueued on the TX ring.
    pub tx_bytes: AtomicU64,
    /// Sends refused because the TX ring was full.
    pub tx_ring_full: AtomicU64,
    /// Sends refused for lack of TX buffers.
    pub tx_no_bufs: AtomicU64,
    /// Messages received.
    pub rx_msgs: AtomicU64,
    /// Bytes received.
    pub rx_bytes: AtomicU64,
    /// Messages discarded because the receive buffer was too small.
    pub rx_too_small: AtomicU64,
    /// Zero.
    pub reserved: AtomicU64,
}

/// The counters block.
#[repr(C)]
pub struct Counters {
    /// Engine-written line.
    pub engine: EngineCounters,
    /// App-written line.
    pub app: AppCounters,
}

/// One side's sleep flag on a cache line of its own.
#[repr(C, align(64))]
pub struct SleepFlag {
    /// App: sleep sequence (odd = sleeping). Engine: 1 = sleeping, 0 = polling.
    pub word: AtomicU32,
    /// 1 if this side's process is registered for `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`,
    /// so the other side may use a membarrier instead of making this side fence every publish.
    pub barrier: AtomicU32,
    /// App: 1 while it waits for transmit room (TX buffers back, or a TX-ring slot): the
    /// engine then also rings after returning buffers or taking messages off the TX ring, not
    /// only after a delivery or a completion (the asynchronous client's `send`). Engine: zero.
    pub want_tx: AtomicU32,
    /// Zero.
    pub reserved: [AtomicU32; 13],
}

/// Doorbell sleep flags: a producer rings the other side's eventfd only while it sleeps.
#[repr(C)]
pub struct Bells {
    /// The application's sleep sequence number: odd while it waits on its doorbell.
    pub app: SleepFlag,
    /// The engine's sleep flag: 1 while it waits on its doorbell.
    pub engine: SleepFlag,
}

/// The parts of a channel, in header-offset order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// [`Counters`].
    Counters = 0,
    /// [`Bells`].
    Bells,
    /// TX ring (app → engine) of [`MsgDesc`].
    TxRing,
    /// RX ring (engine → app) of [`MsgDesc`].
    RxRing,
    /// TX-return ring (engine → app) of `u32`.
    TxRetRing,
    /// RX-return ring (app → engine) of `u32`.
    RxRetRing,
    /// Control submission ring (app → engine) of [`CtrlEntry`].
    Sq,
    /// Control completion ring (engine → app) of [`CtrlEntry`].
    Cq,
    /// TX buffer pool.
    TxPool,
    /// RX buffer pool.
    RxPool,
}

impl Part {
    /// Number of parts.
    pub const COUNT: usize = 10;
    /// All parts in order.
    pub const ALL: [Part; Part::COUNT] = [
        Part::Counters,
        Part::Bells,
        Part::TxRing,
        Part::RxRing,
        Part::TxRetRing,
        Part::RxRetRing,
        Part::Sq,
        Part::Cq,
        Part::TxPool,
        Part::RxPool,
    ];
}

/// Sizes of a channel, chosen by the daemon's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Payload bytes per buffer (one buffer = one packet payload). 64..=65,536.
    pub mss: u32,
    /// Buffers in the TX pool (app-owned at start). 1..=2^24.
    pub tx_bufs: u32,
    /// Buffers in the RX pool (engine-owned at start). 1..=2^24.
    pub rx_bufs: u32,
    /// TX ring entries (messages), a power of two, 2..=2^24.
    pub tx_ring: u32,
    /// RX ring entries (messages), a power of two, 2..=2^24.
    pub rx_ring: u32,
    /// Control SQ and CQ entries each, a power of two, 16..=4096.
    pub ctrl_ring: u32,
}

impl ChannelConfig {
    /// The default channel: 1418-byte buffers, 12,288 per direction, 4096-entry message rings,
    /// 64-entry control queues (36,577,280 bytes ≈ 34.9 MiB).
    pub const DEFAULT: ChannelConfig =
        ChannelConfig { mss: DEFAULT_MSS, tx_bufs: 12288, rx_bufs: 12288, tx_ring: 4096, rx_ring: 4096, ctrl_ring: 64 };
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a [`ChannelConfig`] cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `mss` outside 64..=65,536.
    Mss,
    /// A buffer count outside 1..=2^24.
    Buffers,
    /// A ring size that is not a power of two in its range.
    RingSize,
    /// The region would exceed 2^40 bytes.
    TooLarge,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::Mss => "buffer payload size (mss) must be 64..=65536",
            ConfigError::Buffers => "buffer counts must be 1..=16777216",
            ConfigError::RingSize => "ring sizes must be powers of two (2..=2^24; control 16..=4096)",
            ConfigError::TooLarge => "channel region too large",
        })
    }
}

impl std::error::Error for ConfigError {}

/// Offsets and sizes of every part of a channel, derived from a [`ChannelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The configuration this layout was computed from.
    pub cfg: ChannelConfig,
    /// Distance between buffer slots: payload, then [`BufHdr`], rounded up to a cache line.
    pub buf_stride: usize,
    /// Offset of the [`BufHdr`] in a slot: `mss` rounded up to 16.
    pub buf_hdr_off: usize,
    /// TX-return ring entries: `tx_bufs` rounded up to a power of two (can hold every buffer).
    pub tx_ret_ring: u32,
    /// RX-return ring entries: `rx_bufs` rounded up to a power of two.
    pub rx_ret_ring: u32,
    /// Offsets of the parts, indexed by [`Part`].
    pub offsets: [usize; Part::COUNT],
    /// Total bytes, a multiple of [`PAGE`].
    pub total_len: usize,
}

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

const fn ring_ok(n: u32, min: u32, max: u32) -> bool {
    n.is_power_of_two() && n >= min && n <= max
}

/// Bytes taken by a ring of `entries` slots of `esize` bytes (header included), cache-line
/// aligned.
pub const fn ring_len(entries: u32, esize: usize) -> usize {
    align_up(RING_HDR_LEN + entries as usize * esize, CACHE_LINE)
}

impl Layout {
    /// Computes the layout of `cfg`.
    pub const fn compute(cfg: &ChannelConfig) -> Result<Layout, ConfigError> {
        if cfg.mss < 64 || cfg.mss > 65536 {
            return Err(ConfigError::Mss);
        }
        if cfg.tx_bufs == 0 || cfg.rx_bufs == 0 || cfg.tx_bufs > 1 << 24 || cfg.rx_bufs > 1 << 24 {
            return Err(ConfigError::Buffers);
        }
        if !ring_ok(cfg.tx_ring, 2, 1 << 24) || !ring_ok(cfg.rx_ring, 2, 1 << 24) || !ring_ok(cfg.ctrl_ring, 16, 4096) {
            return Err(ConfigError::RingSize);
        }
        let buf_hdr_off = align_up(cfg.mss as usize, 16);
        let buf_stride = align_up(buf_hdr_off + BUF_HDR_LEN, CACHE_LINE);
        let tx_ret_ring = cfg.tx_bufs.next_power_of_two();
        let rx_ret_ring = cfg.rx_bufs.next_power_of_two();
        let mut offsets = [0usize; Part::COUNT];
        let mut at = size_of::<Header>();
        offsets[Part::Counters as usize] = at;
        at += size_of::<Counters>();
        offsets[Part::Bells as usize] = at;
        at += size_of::<Bells>();
        offsets[Part::TxRing as usize] = at;
        at += ring_len(cfg.tx_ring, size_of::<MsgDesc>());
        offsets[Part::RxRing as usize] = at;
        at += ring_len(cfg.rx_ring, size_of::<MsgDesc>());
        offsets[Part::TxRetRing as usize] = at;
        at += ring_len(tx_ret_ring, size_of::<u32>());
        offsets[Part::RxRetRing as usize] = at;
        at += ring_len(rx_ret_ring, size_of::<u32>());
        offsets[Part::Sq as usize] = at;
        at += ring_len(cfg.ctrl_ring, size_of::<CtrlEntry>());
        offsets[Part::Cq as usize] = at;
        at += ring_len(cfg.ctrl_ring, size_of::<CtrlEntry>());
        at = align_up(at, PAGE);
        offsets[Part::TxPool as usize] = at;
        at += cfg.tx_bufs as usize * buf_stride;
        at = align_up(at, PAGE);
        offsets[Part::RxPool as usize] = at;
        at += cfg.rx_bufs as usize * buf_stride;
        let total_len = align_up(at, PAGE);
        if total_len > 1 << 40 {
            return Err(ConfigError::TooLarge);
        }
        Ok(Layout { cfg: *cfg, buf_stride, buf_hdr_off, tx_ret_ring, rx_ret_ring, offsets, total_len })
    }

    /// Offset of `part`.
    pub const fn offset(&self, part: Part) -> usize {
        self.offsets[part as usize]
    }

    /// Largest message the TX pool can hold at once.
    pub const fn tx_capacity_bytes(&self) -> usize {
        self.cfg.tx_bufs as usize * self.cfg.mss as usize
    }

    /// Largest message the RX pool can hold at once.
    pub const fn rx_capacity_bytes(&self) -> usize {
        self.cfg.rx_bufs as usize * self.cfg.mss as usize
    }
}

/// The layout of [`ChannelConfig::DEFAULT`], computed at compile time.
pub const DEFAULT_LAYOUT: Layout = match Layout::compute(&ChannelConfig::DEFAULT) {
    Ok(l) => l,
    Err(_) => panic!("default channel config does not lay out"),
};

// --- Compile-time layout checks ---------------------------------------------------------------

// Plain descriptor types: exact sizes, no padding (every byte is a field), word-aligned.
const_assert_eq!(size_of::<MachnetFlow>(), 12);
const_assert_eq!(align_of::<MachnetFlow>(), 4);
const_assert_eq!(offset_of!(MachnetFlow, src_ip), 0);
const_assert_eq!(offset_of!(MachnetFlow, dst_ip), 4);
const_assert_eq!(offset_of!(MachnetFlow, src_port), 8);
const_assert_eq!(offset_of!(MachnetFlow, dst_port), 10);
const_assert_eq!(size_of::<MsgDesc>(), 32);
const_assert_eq!(offset_of!(MsgDesc, flow), 0);
const_assert_eq!(offset_of!(MsgDesc, head), 12);
const_assert_eq!(offset_of!(MsgDesc, count), 16);
const_assert_eq!(offset_of!(MsgDesc, len), 20);
const_assert_eq!(offset_of!(MsgDesc, flags), 24);
const_assert_eq!(offset_of!(MsgDesc, reserved), 28);
const_assert_eq!(size_of::<CtrlEntry>(), 32);
const_assert_eq!(offset_of!(CtrlEntry, id), 0);
const_assert_eq!(offset_of!(CtrlEntry, op), 8);
const_assert_eq!(offset_of!(CtrlEntry, status), 12);
const_assert_eq!(offset_of!(CtrlEntry, flow), 16);
const_assert_eq!(offset_of!(CtrlEntry, aux), 28);
const_assert_eq!(size_of::<BufHdr>(), BUF_HDR_LEN);
const_assert_eq!(offset_of!(BufHdr, next), 0);
const_assert_eq!(offset_of!(BufHdr, len), 4);

// Header: 256 bytes, every field where the docs say.
const_assert_eq!(size_of::<Header>(), 256);
const_assert_eq!(offset_of!(Header, magic), 0);
const_assert_eq!(offset_of!(Header, version), 8);
const_assert_eq!(offset_of!(Header, header_len), 12);
const_assert_eq!(offset_of!(Header, total_len), 16);
const_assert_eq!(offset_of!(Header, state), 24);
const_assert_eq!(offset_of!(Header, flags), 28);
const_assert_eq!(offset_of!(Header, mss), 32);
const_assert_eq!(offset_of!(Header, buf_stride), 36);
const_assert_eq!(offset_of!(Header, tx_bufs), 40);
const_assert_eq!(offset_of!(Header, rx_bufs), 44);
const_assert_eq!(offset_of!(Header, tx_ring), 48);
const_assert_eq!(offset_of!(Header, rx_ring), 52);
const_assert_eq!(offset_of!(Header, tx_ret_ring), 56);
const_assert_eq!(offset_of!(Header, rx_ret_ring), 60);
const_assert_eq!(offset_of!(Header, ctrl_ring), 64);
const_assert_eq!(offset_of!(Header, buf_hdr_off), 68);
const_assert_eq!(offset_of!(Header, offsets), 72);
const_assert_eq!(offset_of!(Header, name), 152);
const_assert_eq!(offset_of!(Header, reserved1), 184);

// Counters and bells: each writer owns whole cache lines.
const_assert_eq!(size_of::<EngineCounters>(), CACHE_LINE);
const_assert_eq!(size_of::<AppCounters>(), CACHE_LINE);
const_assert_eq!(offset_of!(Counters, app), CACHE_LINE);
const_assert_eq!(size_of::<Counters>(), 2 * CACHE_LINE);
const_assert_eq!(size_of::<SleepFlag>(), CACHE_LINE);
const_assert_eq!(offset_of!(SleepFlag, barrier), 4);
const_assert_eq!(offset_of!(SleepFlag, want_tx), 8);
const_assert_eq!(offset_of!(Bells, engine), CACHE_LINE);
const_assert_eq!(size_of::<Bells>(), 2 * CACHE_LINE);

// Ring headers: producer and consumer index on separate cache lines, slots after both.
const_assert_eq!(RING_CONS_OFF - RING_PROD_OFF, CACHE_LINE);
const_assert_eq!(RING_HDR_LEN, 2 * CACHE_LINE);

// The default layout: where every part lands.
const_assert_eq!(DEFAULT_LAYOUT.buf_stride, 1472);
const_assert_eq!(DEFAULT_LAYOUT.buf_hdr_off, 1424);
const_assert_eq!(DEFAULT_LAYOUT.tx_ret_ring, 16384);
const_assert_eq!(DEFAULT_LAYOUT.rx_ret_ring, 16384);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::Counters as usize], 256);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::Bells as usize], 384);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::TxRing as usize], 512);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::RxRing as usize], 512 + 128 + 4096 * 32);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::TxRetRing as usize], 512 + 2 * (128 + 4096 * 32));
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::RxRetRing as usize], 512 + 2 * (128 + 4096 * 32) + 128 + 16384 * 4);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::Sq as usize], 512 + 2 * (128 + 4096 * 32) + 2 * (128 + 16384 * 4));
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::Cq as usize], 512 + 2 * (128 + 4096 * 32) + 2 * (128 + 16384 * 4) + 2176);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::TxPool as usize], 401_408);
const_assert_eq!(DEFAULT_LAYOUT.offsets[Part::RxPool as usize], 401_408 + 12288 * 1472);
const_assert_eq!(DEFAULT_LAYOUT.total_len, 401_408 + 2 * 12288 * 1472); // 34.9 MiB
                                                                        // Every part is cache-line aligned, the pools page-aligned.
const_assert!(DEFAULT_LAYOUT.offsets[Part::TxRing as usize] % CACHE_LINE == 0);
const_assert!(DEFAULT_LAYOUT.offsets[Part::RxRetRing as usize] % CACHE_LINE == 0);
const_assert!(DEFAULT_LAYOUT.offsets[Part::Cq as usize] % CACHE_LINE == 0);
const_assert!(DEFAULT_LAYOUT.offsets[Part::TxPool as usize] % PAGE == 0);
const_assert!(DEFAULT_LAYOUT.offsets[Part::RxPool as usize] % PAGE == 0);
// Two 8 MiB messages in flight in each direction.
const_assert!(DEFAULT_LAYOUT.tx_capacity_bytes() >= 2 * MSG_MAX_LEN);
const_assert!(DEFAULT_LAYOUT.rx_capacity_bytes() >= 2 * MSG_MAX_LEN);
// The return rings can hold every buffer of their pool, so returns never need to wait.
const_assert!(DEFAULT_LAYOUT.tx_ret_ring >= ChannelConfig::DEFAULT.tx_bufs);
const_assert!(ChannelConfig::DEFAULT.ctrl_ring >= 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_ordered_aligned_and_disjoint() {
        for cfg in [
            ChannelConfig::DEFAULT,
            ChannelConfig { mss: 64, tx_bufs: 1, rx_bufs: 3, tx_ring: 2, rx_ring: 4, ctrl_ring: 16 },
            ChannelConfig { mss: 9000, tx_bufs: 100, rx_bufs: 7, tx_ring: 64, rx_ring: 2, ctrl_ring: 4096 },
        ] {
            let l = Layout::compute(&cfg).unwrap();
            let ends = [
                l.offset(Part::Counters) + size_of::<Counters>(),
                l.offset(Part::Bells) + size_of::<Bells>(),
                l.offset(Part::TxRing) + ring_len(cfg.tx_ring, 32),
                l.offset(Part::RxRing) + ring_len(cfg.rx_ring, 32),
                l.offset(Part::TxRetRing) + ring_len(l.tx_ret_ring, 4),
                l.offset(Part::RxRetRing) + ring_len(l.rx_ret_ring, 4),
                l.offset(Part::Sq) + ring_len(cfg.ctrl_ring, 32),
                l.offset(Part::Cq) + ring_len(cfg.ctrl_ring, 32),
                l.offset(Part::TxPool) + cfg.tx_bufs as usize * l.buf_stride,
                l.offset(Part::RxPool) + cfg.rx_bufs as usize * l.buf_stride,
            ];
            assert!(l.offset(Part::Counters) >= size_of::<Header>());
            for (i, p) in Part::ALL.iter().enumerate() {
                assert_eq!(l.offset(*p) % CACHE_LINE, 0, "{p:?}");
                if i + 1 < Part::COUNT {
                    assert!(ends[i] <= l.offsets[i + 1], "{p:?} overlaps the next part");
                }
            }
            assert!(ends[Part::COUNT - 1] <= l.total_len);
            assert_eq!(l.total_len % PAGE, 0);
            assert!(l.buf_hdr_off >= cfg.mss as usize && l.buf_hdr_off % 16 == 0);
            assert!(l.buf_stride >= l.buf_hdr_off + BUF_HDR_LEN && l.buf_stride % CACHE_LINE == 0);
            assert!(l.tx_ret_ring >= cfg.tx_bufs && l.rx_ret_ring >= cfg.rx_bufs);
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = ChannelConfig::DEFAULT;
        assert_eq!(Layout::compute(&ChannelConfig { mss: 63, ..ok }), Err(ConfigError::Mss));
        assert_eq!(Layout::compute(&ChannelConfig { mss: 65537, ..ok }), Err(ConfigError::Mss));
        assert_eq!(Layout::compute(&ChannelConfig { tx_bufs: 0, ..ok }), Err(ConfigError::Buffers));
        assert_eq!(Layout::compute(&ChannelConfig { rx_bufs: (1 << 24) + 1, ..ok }), Err(ConfigError::Buffers));
        for bad in [0, 1, 3, 1000, 1 << 25] {
            assert_eq!(Layout::compute(&ChannelConfig { tx_ring: bad, ..ok }), Err(ConfigError::RingSize));
            assert_eq!(Layout::compute(&ChannelConfig { rx_ring: bad, ..ok }), Err(ConfigError::RingSize));
        }
        assert_eq!(Layout::compute(&ChannelConfig { ctrl_ring: 8, ..ok }), Err(ConfigError::RingSize));
    }

    #[test]
    fn flow_helpers() {
        let f = MachnetFlow::new(Ipv4Addr::new(10, 0, 0, 1), 1024, Ipv4Addr::new(10, 0, 0, 2), 888);
        assert_eq!(f.src_ip, 0x0A00_0001);
        assert_eq!(f.reversed().reversed(), f);
        assert_eq!(f.reversed().src_port, 888);
        assert_eq!(f.to_string(), "10.0.0.1:1024 -> 10.0.0.2:888");
    }
}
