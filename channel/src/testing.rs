//! Test support: an engine that speaks the control protocol and serves channels, so the whole
//! channel stack (Rust client, C library, several processes) is testable without the daemon.
//! Not the daemon: no transport, no NIC, no timers.
//!
//! [`TestEngine::start`] runs two threads: a controller serving the control socket
//! ([`CtrlServer`]) and one engine shard polling every channel (adaptive idle: it sleeps on the
//! channels' doorbells when there is nothing to do). Flows:
//!
//! * `listen(ip, port)` succeeds for a local address ([`TestEngineConfig::local_ips`]) and a
//!   free port.
//! * `connect(local, remote, port)` succeeds at once with a made-up source port (1024 and up).
//!   If a channel of this engine listens on `remote:port`, the two channels are connected:
//!   messages cross over (the receiver sees `src = sender`, replies on the reversed flow).
//!   If `port` is [`TestEngineConfig::hold_port`], the flow holds: the first message sent on
//!   it stays engine-held and the channel's TX ring stalls behind it until the flow is closed
//!   (then that message is dropped, later ones on the flow are refused). Otherwise the remote
//!   end is an echo server: every message comes back on the same channel.
//! * `close(flow)` ends a flow; the connected peer gets a [`EventKind::FlowClosed`] event.
//! * Messages on flows the channel does not own are refused with [`Status::NoSuchFlow`].
//!
//! When an application detaches a channel or its registration connection closes, the shard
//! closes its flows and calls [`EngineChannel::reclaim_all`]; the result is recorded as a
//! [`ReclaimRecord`] for tests to check.

pub mod process;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ctrl::{AppId, ChannelGrant, CtrlHandler, CtrlServer, PeerCred};
use crate::engine::{EngineChannel, EngineStats, Reclaim, TxMsg};
use crate::layout::{ChannelConfig, MachnetFlow};
use crate::ops::{CtrlOp, Event, EventKind, Status};
use crate::shm;

/// Configuration of a [`TestEngine`].
#[derive(Clone, Debug)]
pub struct TestEngineConfig {
    /// Control socket path; `None` picks a unique path under the temp directory.
    pub socket: Option<PathBuf>,
    /// Sizes of every channel.
    pub channel: ChannelConfig,
    /// Addresses `listen`/`connect` accept as local.
    pub local_ips: Vec<Ipv4Addr>,
    /// Remote port whose flows hold their first message (see the module docs).
    pub hold_port: u16,
    /// Try hugepage-backed channels.
    pub hugepages: bool,
}

impl Default for TestEngineConfig {
    fn default() -> Self {
        TestEngineConfig {
            socket: None,
            channel: ChannelConfig::DEFAULT,
            local_ips: vec![Ipv4Addr::new(198, 18, 0, 1)],
            hold_port: 9,
            hugepages: false,
        }
    }
}

/// A unique path for a socket or file in the temp directory (pid + counter + tag).
pub fn unique_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("machnet-{}-{}-{}", std::process::id(), n, tag))
}

/// What the engine found when it reclaimed a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimRecord {
    /// Channel id.
    pub channel: u64,
    /// Owning application.
    pub app: AppId,
    /// Where the buffers were.
    pub reclaim: Reclaim,
    /// Accounting right after reclaiming (every TX buffer reclaimed, every RX buffer free).
    pub after: EngineStats,
}

/// One live channel's accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// Channel id.
    pub channel: u64,
    /// Owning application.
    pub app: AppId,
    /// Buffer accounting and counters.
    pub stats: EngineStats,
}

#[derive(Default)]
struct Shared {
    reclaims: Mutex<Vec<ReclaimRecord>>,
    registrations: Mutex<Vec<(AppId, PeerCred)>>,
    live: AtomicUsize,
}

enum Cmd {
    Add { id: u64, app: AppId, ch: Box<EngineChannel> },
    Remove { id: u64 },
    RemoveApp { app: AppId },
    Snapshot(Sender<Vec<ChannelSnapshot>>),
}

/// A running test engine. Stops (and removes its socket) on drop.
pub struct TestEngine {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    cmds: Sender<Cmd>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TestEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEngine").field("path", &self.path).finish_non_exhaustive()
    }
}

impl TestEngine {
    /// Binds the control socket and starts the controller and shard threads.
    pub fn start(cfg: TestEngineConfig) -> io::Result<TestEngine> {
        crate::layout::Layout::compute(&cfg.channel).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let path = cfg.socket.clone().unwrap_or_else(|| unique_path("ctrl.sock"));
        let server = CtrlServer::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(shm::eventfd()?);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let mut shard = Shard::new(&cfg, rx, shared.clone(), stop.clone(), wake.clone());
        let t_shard = std::thread::Builder::new().name("machnet-test-shard".into()).spawn(move || shard.run())?;
        let mut ctl = Controller {
            cfg: cfg.clone(),
            next_id: 1,
            owners: HashMap::new(),
            cmds: tx.clone(),
            wake: wake.clone(),
            shared: shared.clone(),
        };
        let stop2 = stop.clone();
        let t_ctl = std::thread::Builder::new().name("machnet-test-ctl".into()).spawn(move || {
            let mut server = server;
            while !stop2.load(Ordering::Relaxed) {
                if server.poll(Some(Duration::from_millis(20)), &mut ctl).is_err() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })?;
        Ok(TestEngine { path, stop, wake, cmds: tx, shared, threads: vec![t_shard, t_ctl] })
    }

    /// The control socket path (set `MACHNET_CTRL_SOCK` to it for clients).
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Accounting of every live channel.
    pub fn snapshot(&self) -> Vec<ChannelSnapshot> {
        let (tx, rx) = mpsc::channel();
        if self.cmds.send(Cmd::Snapshot(tx)).is_err() {
            return Vec::new();
        }
        shm::ring(self.wake.as_fd());
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    }

    /// Channels reclaimed so far (detached or their application gone).
    pub fn reclaimed(&self) -> Vec<ReclaimRecord> {
        self.shared.reclaims.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Registrations so far, with the credentials from `SO_PEERCRED`.
    pub fn registrations(&self) -> Vec<(AppId, PeerCred)> {
        self.shared.registrations.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Channels currently served.
    pub fn live_channels(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Polls `pred` every few milliseconds until it holds or `timeout` passes; returns whether
    /// it held.
    pub fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&TestEngine) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        shm::ring(self.wake.as_fd());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Controller {
    cfg: TestEngineConfig,
    next_id: u64,
    owners: HashMap<u64, AppId>,
    cmds: Sender<Cmd>,
    wake: Arc<OwnedFd>,
    shared: Arc<Shared>,
}

impl Controller {
    fn send(&self, c: Cmd) {
        let _ = self.cmds.send(c);
        shm::ring(self.wake.as_fd());
    }
}

impl CtrlHandler for Controller {
    fn register(&mut self, app: AppId, cred: PeerCred) -> Result<(), Status> {
        self.shared.registrations.lock().unwrap_or_else(|e| e.into_inner()).push((app, cred));
        Ok(())
    }

    fn create_channel(&mut self, app: AppId) -> Result<ChannelGrant, Status> {
        let id = self.next_id;
        self.next_id += 1;
        let name = format!("machnet-test-{id}");
        let (ch, fds) =
            EngineChannel::create(&self.cfg.channel, &name, self.cfg.hugepages).map_err(|_| Status::NoResources)?;
        self.owners.insert(id, app);
        self.shared.live.fetch_add(1, Ordering::SeqCst);
        self.send(Cmd::Add { id, app, ch: Box::new(ch) });
        Ok(ChannelGrant { id, fds })
    }

    fn detach_channel(&mut self, app: AppId, channel: u64) -> Result<(), Status> {
        if self.owners.get(&channel) != Some(&app) {
            return Err(Status::NoSuchChannel);
        }
        self.owners.remove(&channel);
        self.send(Cmd::Remove { id: channel });
        Ok(())
    }

    fn app_gone(&mut self, app: AppId) {
        self.owners.retain(|_, a| *a != app);
        self.send(Cmd::RemoveApp { app });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteKind {
    Echo,
    Hold,
    Peer(u64),
}

#[derive(Clone, Copy, Debug)]
struct Route {
    owner: u64,
    kind: RouteKind,
}

/// Why a channel's TX processing is paused.
#[derive(Clone, Copy, Debug)]
enum Stalled {
    /// A message on a hold flow, engine-held until the flow is closed.
    Hold(TxMsg),
    /// A message waiting for RX buffers at `target` (channel id).
    Copy { msg: TxMsg, target: u64, flow: MachnetFlow },
    /// A built RX chain waiting for room on `target`'s RX ring.
    Deliver { target: u64, flow: MachnetFlow, head: u32, count: u32, len: u32 },
}

struct Chan {
    id: u64,
    app: AppId,
    ch: Box<EngineChannel>,
    stalled: Option<Stalled>,
}

struct Shard {
    chans: Vec<Chan>,
    flows: HashMap<MachnetFlow, Route>,
    listeners: HashMap<(u32, u16), u64>,
    ports: HashSet<u16>,
    next_port: u16,
    local_ips: Vec<Ipv4Addr>,
    hold_port: u16,
    scratch: Vec<u8>,
    cmds: Receiver<Cmd>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
}

/// TX messages taken per channel per round.
const TX_BUDGET: usize = 32;
/// Idle rounds (yielding) before sleeping.
const IDLE_ROUNDS: u32 = 64;

impl Shard {
    fn new(
        cfg: &TestEngineConfig,
        cmds: Receiver<Cmd>,
        shared: Arc<Shared>,
        stop: Arc<AtomicBool>,
        wake: Arc<OwnedFd>,
    ) -> Shard {
        Shard {
            chans: Vec::new(),
            flows: HashMap::new(),
            listeners: HashMap::new(),
            ports: HashSet::new(),
            next_port: 1024,
            local_ips: cfg.local_ips.clone(),
            hold_port: cfg.hold_port,
            scratch: vec![0; cfg.channel.mss as usize],
            cmds,
            shared,
            stop,
            wake,
        }
    }

    fn run(&mut self) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let mut work = self.commands();
            for ci in 0..self.chans.len() {
                work |= self.poll_chan(ci);
            }
            for c in &mut self.chans {
                c.ch.flush();
            }
            if work {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_ROUNDS {
                std::thread::yield_now();
                continue;
            }
            self.sleep();
            idle = 0;
        }
        let ids: Vec<u64> = self.chans.iter().map(|c| c.id).collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Sleeps on the wake eventfd and every channel's engine doorbell (at most 20 ms, so
    /// stalled work is retried).
    fn sleep(&mut self) {
        for c in &mut self.chans {
            c.ch.announce_sleep();
        }
        let barrier = crate::engine::sleep_barrier();
        let mut ok = true;
        for c in &mut self.chans {
            ok &= c.ch.is_idle(barrier);
        }
        if ok {
            let mut pfds = vec![libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            for c in &self.chans {
                pfds.push(libc::pollfd { fd: c.ch.engine_bell().as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: a valid array of pollfds.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
            shm::drain(self.wake.as_fd());
        }
        for c in &mut self.chans {
            c.ch.finish_sleep();
        }
    }

    fn index(&self, id: u64) -> Option<usize> {
        self.chans.iter().position(|c| c.id == id)
    }

    fn commands(&mut self) -> bool {
        let mut any = false;
        while let Ok(c) = self.cmds.try_recv() {
            any = true;
            match c {
                Cmd::Add { id, app, ch } => self.chans.push(Chan { id, app, ch, stalled: None }),
                Cmd::Remove { id } => self.remove(id),
                Cmd::RemoveApp { app } => {
                    let ids: Vec<u64> = self.chans.iter().filter(|c| c.app == app).map(|c| c.id).collect();
                    for id in ids {
                        self.remove(id);
                    }
                }
                Cmd::Snapshot(reply) => {
                    let v = self
                        .chans
                        .iter_mut()
                        .map(|c| ChannelSnapshot { channel: c.id, app: c.app, stats: c.ch.stats() })
                        .collect();
                    let _ = reply.send(v);
                }
            }
        }
        any
    }

    /// Closes everything of channel `id`, reclaims its buffers and records the result.
    fn remove(&mut self, id: u64) {
        let Some(ci) = self.index(id) else { return };
        let owned: Vec<(MachnetFlow, Route)> =
            self.flows.iter().filter(|(_, r)| r.owner == id).map(|(f, r)| (*f, *r)).collect();
        for (f, r) in owned {
            self.close_flow(f, r);
        }
        self.listeners.retain(|_, c| *c != id);
        // A chain this channel built in another channel's pool goes back to that pool.
        if let Some(Stalled::Deliver { target, head, count, .. }) = self.chans[ci].stalled {
            if target != id {
                if let Some(ti) = self.index(target) {
                    self.chans[ti].ch.free_rx_chain(head, count);
                }
            }
        }
        let mut c = self.chans.swap_remove(ci);
        let reclaim = c.ch.reclaim_all();
        let after = c.ch.stats();
        self.shared.reclaims.lock().unwrap_or_else(|e| e.into_inner()).push(ReclaimRecord {
            channel: id,
            app: c.app,
            reclaim,
            after,
        });
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
    }

    /// Removes flow `f` (and its peer's side), telling the peer.
    fn close_flow(&mut self, f: MachnetFlow, r: Route) {
        self.flows.remove(&f);
        self.ports.remove(&f.src_port);
        if let RouteKind::Peer(p) = r.kind {
            let pf = f.reversed();
            if self.flows.get(&pf).is_some_and(|pr| pr.owner == p) {
                self.flows.remove(&pf);
                if let Some(pi) = self.index(p) {
                    self.chans[pi].ch.post_event(Event {
                        kind: EventKind::FlowClosed,
                        flow: pf,
                        status: Status::Closed,
                        aux: 0,
                    });
                }
            }
        }
    }

    /// One round for channel `ci`: control requests, then up to [`TX_BUDGET`] messages.
    fn poll_chan(&mut self, ci: usize) -> bool {
        let mut work = false;
        while let Some(req) = self.chans[ci].ch.poll_ctrl() {
            work = true;
            if let Ok(req) = req {
                let result = self.control(ci, req.op);
                // The CQ has an overflow queue; a full one means the app ignores its CQ.
                let _ = self.chans[ci].ch.complete(req.id, result);
            }
        }
        if let Some(s) = self.chans[ci].stalled.take() {
            self.chans[ci].stalled = self.retry(ci, s);
            if self.chans[ci].stalled.is_some() {
                return work;
            }
            work = true;
        }
        for _ in 0..TX_BUDGET {
            let Some(m) = self.chans[ci].ch.poll_tx() else { break };
            work = true;
            let Ok(msg) = m else { continue };
            if let Some(s) = self.transmit(ci, msg) {
                self.chans[ci].stalled = Some(s);
                break;
            }
        }
        work
    }

    fn control(&mut self, ci: usize, op: CtrlOp) -> Result<MachnetFlow, Status> {
        let id = self.chans[ci].id;
        match op {
            CtrlOp::Listen { ip, port } => {
                if !self.local_ips.contains(&ip) {
                    return Err(Status::AddrNotLocal);
                }
                if port == 0 {
                    return Err(Status::BadRequest);
                }
                if self.listeners.contains_key(&(ip.to_bits(), port)) || self.ports.contains(&port) {
                    return Err(Status::AddrInUse);
                }
                self.listeners.insert((ip.to_bits(), port), id);
                Ok(MachnetFlow { src_ip: ip.to_bits(), src_port: port, ..Default::default() })
            }
            CtrlOp::Connect { local_ip, remote_ip, remote_port } => {
                if !self.local_ips.contains(&local_ip) {
                    return Err(Status::AddrNotLocal);
                }
                if remote_ip.is_unspecified() {
                    return Err(Status::BadRequest);
                }
                let Some(sport) = self.alloc_port() else { return Err(Status::NoResources) };
                let flow = MachnetFlow::new(local_ip, sport, remote_ip, remote_port);
                let kind = if remote_port == self.hold_port {
                    RouteKind::Hold
                } else if let Some(&l) = self.listeners.get(&(remote_ip.to_bits(), remote_port)) {
                    self.flows.insert(flow.reversed(), Route { owner: l, kind: RouteKind::Peer(id) });
                    RouteKind::Peer(l)
                } else {
                    RouteKind::Echo
                };
                self.flows.insert(flow, Route { owner: id, kind });
                Ok(flow)
            }
            CtrlOp::Close { flow } => match self.flows.get(&flow).copied() {
                Some(r) if r.owner == id => {
                    self.close_flow(flow, r);
                    if let Some(Stalled::Hold(m)) = self.chans[ci].stalled {
                        if m.flow == flow {
                            self.chans[ci].ch.free_tx_chain(m.head);
                            self.chans[ci].stalled = None;
                        }
                    }
                    Ok(flow)
                }
                _ => Err(Status::NoSuchFlow),
            },
        }
    }

    fn alloc_port(&mut self) -> Option<u16> {
        for _ in 0..64512 {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { 1024 } else { p + 1 };
            if !self.ports.contains(&p) && !self.listeners.keys().any(|k| k.1 == p) {
                self.ports.insert(p);
                return Some(p);
            }
        }
        None
    }

    /// Routes an accepted message. Returns the stall if it cannot complete now.
    fn transmit(&mut self, ci: usize, msg: TxMsg) -> Option<Stalled> {
        let id = self.chans[ci].id;
        let route = match self.flows.get(&msg.flow) {
            Some(r) if r.owner == id => *r,
            _ => {
                self.chans[ci].ch.refuse_tx(&msg, Status::NoSuchFlow);
                return None;
            }
        };
        match route.kind {
            RouteKind::Hold => Some(Stalled::Hold(msg)),
            RouteKind::Echo => self.copy(ci, msg, id, msg.flow.reversed()),
            RouteKind::Peer(p) => self.copy(ci, msg, p, msg.flow),
        }
    }

    fn retry(&mut self, ci: usize, s: Stalled) -> Option<Stalled> {
        match s {
            Stalled::Hold(_) => Some(s),
            Stalled::Copy { msg, target, flow } => self.copy(ci, msg, target, flow),
            Stalled::Deliver { target, flow, head, count, len } => {
                let ti = self.index(target)?;
                match self.chans[ti].ch.deliver(flow, head, count, len) {
                    Ok(()) => None,
                    Err(_) => Some(s),
                }
            }
        }
    }

    /// Copies `msg` from channel `ci` into RX buffers of channel `target` and delivers it as
    /// received on `flow`; the TX buffers are freed ("acknowledged") once copied.
    fn copy(&mut self, ci: usize, msg: TxMsg, target: u64, flow: MachnetFlow) -> Option<Stalled> {
        let Some(ti) = self.index(target) else {
            self.chans[ci].ch.refuse_tx(&msg, Status::Unreachable);
            return None;
        };
        if (self.chans[ti].ch.layout().cfg.rx_bufs as u64) < msg.count as u64 {
            self.chans[ci].ch.refuse_tx(&msg, Status::NoResources);
            return None;
        }
        if self.chans[ti].ch.rx_available() < msg.count as usize {
            return Some(Stalled::Copy { msg, target, flow });
        }
        let mut seg = Some(msg.head);
        let mut head = u32::MAX;
        let mut prev: Option<u32> = None;
        while let Some(idx) = seg {
            let n = self.chans[ci].ch.read_seg(idx, &mut self.scratch);
            let rx = self.chans[ti].ch.alloc_rx(&self.scratch[..n]).expect("rx buffers were counted");
            match prev {
                Some(p) => {
                    self.chans[ti].ch.link_rx(p, rx);
                }
                None => head = rx,
            }
            prev = Some(rx);
            seg = self.chans[ci].ch.seg_next(idx);
        }
        self.chans[ci].ch.free_tx_chain(msg.head);
        match self.chans[ti].ch.deliver(flow, head, msg.count, msg.len) {
            Ok(()) => None,
            Err(_) => Some(Stalled::Deliver { target, flow, head, count: msg.count, len: msg.len }),
        }
    }
}

/// A raw second mapping of a channel for tests and fuzzing: plays a buggy or hostile
/// application by writing anything anywhere. Every access is an atomic load/store of one byte
/// or one aligned word, so it is sound even while an engine in another thread reads the same
/// memory.
pub struct RawView {
    map: crate::shm::Mapping,
    lay: crate::layout::Layout,
}

impl std::fmt::Debug for RawView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawView").field("len", &self.map.len()).finish()
    }
}

impl RawView {
    /// Maps the channel memfd `fd`, laid out as `lay`.
    pub fn map(fd: std::os::fd::BorrowedFd<'_>, lay: crate::layout::Layout) -> io::Result<RawView> {
        let len = shm::file_len(fd)?;
        if len < lay.total_len {
            return Err(io::Error::from(io::ErrorKind::InvalidData));
        }
        Ok(RawView { map: crate::shm::Mapping::map(fd, len)?, lay })
    }

    /// The layout.
    pub fn layout(&self) -> &crate::layout::Layout {
        &self.lay
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn word(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(off % 4 == 0 && off + 4 <= self.map.len());
        // SAFETY: inside the mapping and 4-aligned; shared memory is accessed atomically.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.map.base().as_ptr().add(off).cast()) }
    }

    /// Reads the aligned word at `off`.
    pub fn read_u32(&self, off: usize) -> u32 {
        self.word(off).load(Ordering::Acquire)
    }

    /// Writes the aligned word at `off` (release).
    pub fn write_u32(&self, off: usize, v: u32) {
        self.word(off).store(v, Ordering::Release)
    }

    /// Writes `data` at `off` (clipped to the mapping), byte by byte.
    pub fn write_bytes(&self, off: usize, data: &[u8]) {
        let end = off.saturating_add(data.len()).min(self.map.len());
        for (i, b) in (off..end).zip(data) {
            // SAFETY: inside the mapping; byte atomics are always aligned.
            unsafe { std::sync::atomic::AtomicU8::from_ptr(self.map.base().as_ptr().add(i)) }
                .store(*b, Ordering::Relaxed);
        }
    }

    /// Writes a `u32`-word `#[repr(C)]` value at `off` (4-aligned).
    fn write_words<T: crate::ring::Slot>(&self, off: usize, v: T) {
        let words = std::mem::size_of::<T>() / 4;
        let src = (&v as *const T).cast::<u32>();
        for i in 0..words {
            // SAFETY: reads word i of the local `v` (Slot: no padding, size multiple of 4).
            self.write_u32(off + 4 * i, unsafe { src.add(i).read() });
        }
    }

    /// Offset of slot `index` of ring `part` whose elements are `esize` bytes.
    pub fn ring_slot(&self, part: crate::layout::Part, entries: u32, esize: usize, index: u32) -> usize {
        self.lay.offset(part) + crate::layout::RING_HDR_LEN + (index & (entries - 1)) as usize * esize
    }

    /// Producer index word of ring `part`.
    pub fn prod_off(&self, part: crate::layout::Part) -> usize {
        self.lay.offset(part) + crate::layout::RING_PROD_OFF
    }

    /// Consumer index word of ring `part`.
    pub fn cons_off(&self, part: crate::layout::Part) -> usize {
        self.lay.offset(part) + crate::layout::RING_CONS_OFF
    }

    /// Offset of buffer `idx`'s header in `pool` (no range check: the accessors assert).
    pub fn buf_off(&self, pool: crate::layout::Part, idx: u32) -> usize {
        self.lay.offset(pool) + idx as usize * self.lay.buf_stride + self.lay.buf_hdr_off
    }

    /// Sets the header of TX/RX buffer `idx`.
    pub fn set_buf(&self, pool: crate::layout::Part, idx: u32, next: u32, len: u32) {
        let o = self.buf_off(pool, idx);
        self.write_u32(o, next);
        self.write_u32(o + 4, len);
    }

    /// Appends a descriptor to the TX ring as a (careless) application would: slot at the
    /// current producer index, then the index bumped.
    pub fn push_tx(&self, d: crate::layout::MsgDesc) {
        use crate::layout::Part;
        let p = self.read_u32(self.prod_off(Part::TxRing));
        self.write_words(self.ring_slot(Part::TxRing, self.lay.cfg.tx_ring, 32, p), d);
        self.write_u32(self.prod_off(Part::TxRing), p.wrapping_add(1));
    }

    /// Appends a request to the control SQ.
    pub fn push_sq(&self, e: crate::layout::CtrlEntry) {
        use crate::layout::Part;
        let p = self.read_u32(self.prod_off(Part::Sq));
        self.write_words(self.ring_slot(Part::Sq, self.lay.cfg.ctrl_ring, 32, p), e);
        self.write_u32(self.prod_off(Part::Sq), p.wrapping_add(1));
    }

    /// Appends a buffer index to the RX-return ring.
    pub fn push_rx_return(&self, idx: u32) {
        use crate::layout::Part;
        let p = self.read_u32(self.prod_off(Part::RxRetRing));
        self.write_u32(self.ring_slot(Part::RxRetRing, self.lay.rx_ret_ring, 4, p), idx);
        self.write_u32(self.prod_off(Part::RxRetRing), p.wrapping_add(1));
    }
}
