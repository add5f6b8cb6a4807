//! The controller: the control socket's handler. It registers applications, creates their
//! channels and hands each to the least loaded shard, and when an application goes away has
//! its shard close everything it owned. It also answers statistics requests (`machnetctl`)
//! from the snapshots the shards publish, and applies the access list.

use crate::capture;
use crate::shard::{ChannelSlot, Reporting, ShardCmd, ShardReport};
use hashbrown::HashMap;
use machnet::ctrl::{AppId, ChannelGrant, CtrlHandler, PeerCred, CAPTURE_READ, CAPTURE_START, CAPTURE_STOP};
use machnet::engine::{EngineChannel, Violation};
use machnet::layout::ChannelConfig;
use machnet::ops::Status;
use machnet_runtime::idle::Waker;
use machnet_runtime::shard::ShardStats;
use serde_json::{json, Value};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Statistics selector bits (`machnetctl`): list the flows.
pub const STATS_FLOWS: u64 = 1;
/// List the channels.
pub const STATS_CHANNELS: u64 = 2;
/// List the ARP tables.
pub const STATS_ARP: u64 = 4;
/// Version of the statistics document.
pub const STATS_VERSION: u32 = 1;

/// Bytes the allocator has handed out and not had back (every arena): what `machnetctl status`
/// reports as `heap_bytes`, to tell a leak from resident-memory noise.
pub fn heap_in_use() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        let m = unsafe { libc::mallinfo2() };
        (m.uordblks + m.hblkhd) as u64
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// What the controller reads about one shard.
pub struct ShardView {
    /// The shard's own report (counters; lists on request).
    pub report: Arc<Reporting>,
    /// The runtime's statistics of the shard thread (stages, loops, parks).
    pub stats: Arc<Mutex<ShardStats>>,
    /// The core it is pinned to.
    pub core: Option<usize>,
}

/// What `machnetctl status` shows about the daemon.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// IP address.
    pub ip: std::net::Ipv4Addr,
    /// MAC address.
    pub mac: String,
    /// "udp" or "dpdk".
    pub backend: String,
    /// The port: tunnel address or DPDK device.
    pub port: String,
    /// Idle policy.
    pub idle: String,
    /// The configuration file.
    pub config: String,
}

/// Who may use the daemon (beyond the control socket's file permissions).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Allowed user ids (root is always allowed). Empty with `allow_gids` empty: everyone.
    pub allow_uids: Vec<u32>,
    /// Allowed group ids (primary or supplementary).
    pub allow_gids: Vec<u32>,
}

impl Access {
    /// Whether `cred` may register or read statistics.
    pub fn allows(&self, cred: &PeerCred) -> bool {
        if (self.allow_uids.is_empty() && self.allow_gids.is_empty()) || cred.uid == 0 {
            return true;
        }
        if self.allow_uids.contains(&cred.uid) || self.allow_gids.contains(&cred.gid) {
            return true;
        }
        // Supplementary groups are not in SO_PEERCRED: read them from /proc.
        let status = std::fs::read_to_string(format!("/proc/{}/status", cred.pid)).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("Groups:")).is_some_and(|g| {
            g.split_whitespace().filter_map(|x| x.parse().ok()).any(|g: u32| self.allow_gids.contains(&g))
        })
    }
}

/// The controller's handle on one shard.
pub struct ShardLink {
    /// Commands.
    pub cmds: SyncSender<ShardCmd>,
    /// Wakes the shard after a command.
    pub waker: Waker,
    /// Channels assigned.
    pub channels: usize,
}

struct App {
    cred: PeerCred,
    channels: Vec<(u64, usize)>,
    since: Instant,
}

/// Serves the control protocol for the daemon.
pub struct Controller {
    shards: Vec<ShardLink>,
    apps: HashMap<AppId, App>,
    channel_cfg: ChannelConfig,
    max_channels: usize,
    /// Channels one application may have.
    max_channels_per_app: usize,
    next_channel: u64,
    hugepages: bool,
    views: Vec<ShardView>,
    info: Option<DaemonInfo>,
    access: Access,
    started: Instant,
    /// Registrations and statistics requests refused by the access list.
    refused: u64,
    /// The packet capture in progress, if any.
    capture: Option<CaptureSession>,
}

/// A `machnetctl capture`: its connection, each shard's reader, and the offset from the
/// shards' clock (`CLOCK_MONOTONIC`) to the wall clock at its start.
struct CaptureSession {
    conn: AppId,
    readers: Vec<capture::Reader>,
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Controller {
    /// A controller for `shards`, creating channels of `channel_cfg`, at most `max_channels`.
    pub fn new(shards: Vec<ShardLink>, channel_cfg: ChannelConfig, max_channels: usize) -> Self {
        Controller {
            shards,
            apps: HashMap::new(),
            channel_cfg,
            max_channels,
            max_channels_per_app: max_channels,
            next_channel: 1,
            hugepages: true,
            views: Vec::new(),
            info: None,
            access: Access::default(),
            started: Instant::now(),
            refused: 0,
            capture: None,
        }
    }

    /// What statistics requests report: the daemon and its shards (in shard order).
    pub fn with_stats(mut self, info: DaemonInfo, views: Vec<ShardView>) -> Self {
        self.info = Some(info);
        self.views = views;
        self
    }

    /// At most `n` channels per application (default: `max_channels`).
    pub fn with_channels_per_app(mut self, n: usize) -> Self {
        self.max_channels_per_app = n;
        self
    }

    /// The access list.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Asks every shard for a fresh report with its lists and waits (briefly) until each has
    /// published it.
    fn refresh_detail(&self) {
        let mut targets = Vec::with_capacity(self.views.len());
        for v in &self.views {
            let mut r = v.report.report.lock().unwrap_or_else(|e| e.into_inner());
            r.detail_wanted = r.detail.seq + 1;
            targets.push(r.detail_wanted);
            v.report.asked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        for l in &self.shards {
            l.waker.wake();
        }
        let deadline = Instant::now() + Duration::from_millis(250);
        for (v, t) in self.views.iter().zip(targets) {
            while v.report.report.lock().map(|r| r.detail.seq < t).unwrap_or(false) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }

    /// The statistics document (`machnetctl`'s input).
    pub fn stats_json(&self, selector: u64) -> Value {
        // A parked shard publishes nothing: wake every shard and wait for a fresh report.
        self.refresh_detail();
        let reports: Vec<ShardReport> = self.views.iter().map(|v| v.report.snapshot()).collect();
        let stats: Vec<ShardStats> =
            self.views.iter().map(|v| v.stats.lock().map(|s| s.clone()).unwrap_or_default()).collect();
        // Channel id -> (app, shard), and the shards' owner index -> channel.
        let mut channel_of = HashMap::new();
        for (aid, a) in &self.apps {
            for &(id, shard) in &a.channels {
                channel_of.insert(id, (aid.0, shard));
            }
        }
        let flows: usize = reports.iter().map(|r| r.flows).sum();
        let channels: usize = reports.iter().map(|r| r.channels).sum();
        let mut doc = json!({
            "version": STATS_VERSION,
            "status": {
                "pid": std::process::id(),
                "ip": self.info.as_ref().map(|i| i.ip.to_string()),
                "mac": self.info.as_ref().map(|i| i.mac.clone()),
                "backend": self.info.as_ref().map(|i| i.backend.clone()),
                "port": self.info.as_ref().map(|i| i.port.clone()),
                "idle": self.info.as_ref().map(|i| i.idle.clone()),
                "config": self.info.as_ref().map(|i| i.config.clone()),
                "shards": self.views.len(),
                "uptime_s": self.started.elapsed().as_secs_f64(),
                "apps": self.apps.len(),
                "channels": channels,
                "flows": flows,
                "access_refused": self.refused,
                "heap_bytes": heap_in_use(),
            },
        });
        let shards: Vec<Value> = reports
            .iter()
            .zip(&stats)
            .zip(&self.views)
            .enumerate()
            .map(|(i, ((r, st), v))| {
                let up = st.uptime.as_nanos().max(1) as f64;
                let stages: Vec<Value> = st
                    .stages
                    .iter()
                    .map(|(name, s)| {
                        json!({"name": name, "polls": s.polls, "busy_polls": s.busy_polls, "work": s.work,
                               "busy_ns": s.busy_ns, "idle_ns": s.idle_ns, "stalls": s.stalls, "max_poll_ns": s.max_poll_ns})
                    })
                    .collect();
                let violations: serde_json::Map<String, Value> = Violation::ALL
                    .iter()
                    .map(|v| (format!("{v:?}"), json!(r.counters.violations_by_reason[*v as usize])))
                    .collect();
                let c = &r.counters;
                let counters = json!({
                        "rx_dropped": c.rx_dropped, "arp_replies": c.arp_replies, "arp_requests": c.arp_requests,
                        "arp_ignored": c.arp_ignored, "arp_revalidations": c.arp_revalidations,
                        "arp_changed": c.arp_changed, "arp_suspected": c.arp_suspected,
                        "icmp_replies": c.icmp_replies, "tx_refused": c.tx_refused, "tx_rejected": c.tx_rejected,
                        "channel_violations": c.channel_violations, "violations": violations,
                        "channels_closed_violation": c.channels_closed_violation,
                        "channels_poisoned": c.channels_poisoned, "tx_dropped": c.tx_dropped,
                        "rx_orphaned": c.rx_orphaned, "linger_expired": c.linger_expired,
                        "timer_overflow": c.timer_overflow, "handoff_sent": c.handoff_sent,
                        "handoff_received": c.handoff_received, "handoff_dropped": c.handoff_dropped,
                        "handoff_frames_sent": c.handoff_frames_sent,
                        "handoff_frames_received": c.handoff_frames_received,
                        "port_rx_frames": c.port_rx_frames, "port_tx_frames": c.port_tx_frames,
                        "port_rx_dropped": c.port_rx_dropped,
                        "max_channel_op_cpu_us": c.max_channel_op_cpu_ns as f64 / 1e3,
                    });
                json!({
                    "index": i,
                    "core": v.core,
                    "uptime_s": st.uptime.as_secs_f64(),
                    "loops": st.loops.loops,
                    "idle_loops": st.loops.idle_loops,
                    "yields": st.loops.yields,
                    "parks": st.loops.parks,
                    "woken": st.loops.woken,
                    "parked_share": st.loops.parked_ns as f64 / up,
                    "stalls": st.loops.stalls,
                    "max_loop_us": st.loops.max_loop_ns as f64 / 1e3,
                    // Where the longest loop's time went: the publish window that held it, as
                    // the kernel accounted the shard thread (ran: its own work; waited: other
                    // processes had the CPU; the rest beyond parked: the host took the CPU).
                    "max_loop_window": {
                        "window_us": st.loops.max_loop.window_ns as f64 / 1e3,
                        "ran_us": st.loops.max_loop.ran_ns as f64 / 1e3,
                        "waited_us": st.loops.max_loop.waited_ns as f64 / 1e3,
                        "parked_us": st.loops.max_loop.parked_ns as f64 / 1e3,
                        "unaccounted_us": st.loops.max_loop.window_ns.saturating_sub(
                            st.loops.max_loop.ran_ns + st.loops.max_loop.waited_ns + st.loops.max_loop.parked_ns) as f64 / 1e3,
                    },
                    "cpu_s": st.loops.cpu_ns as f64 / 1e9,
                    "runqueue_s": st.loops.runqueue_ns as f64 / 1e9,
                    "stages": stages,
                    "channels": r.channels,
                    "flows": r.flows,
                    "half_open": r.half_open,
                    "endpoint": r.endpoint,
                    "counters": counters,
                    "faults": r.faults.map(|f| json!({"offered": f.offered, "dropped": f.dropped,
                        "duplicated": f.duplicated, "reordered": f.reordered, "corrupted": f.corrupted})),
                })
            })
            .collect();
        doc["shards"] = Value::Array(shards);
        let mut apps: Vec<(&AppId, &App)> = self.apps.iter().collect();
        apps.sort_by_key(|(id, _)| id.0);
        doc["apps"] = Value::Array(
            apps.iter()
                .map(|(id, a)| {
                    json!({"id": id.0, "pid": a.cred.pid, "uid": a.cred.uid, "gid": a.cred.gid,
                           "registered_s": a.since.elapsed().as_secs_f64(),
                           "channels": a.channels.iter().map(|c| c.0).collect::<Vec<_>>()})
                })
                .collect(),
        );
        let pid_of = |app: u64| self.apps.get(&AppId(app)).map(|a| a.cred.pid);
        if selector & STATS_CHANNELS != 0 {
            let mut list = Vec::new();
            for (shard, r) in reports.iter().enumerate() {
                for c in &r.detail.channels {
                    let s = &c.stats;
                    list.push(json!({
                        "id": c.id, "app": c.app, "pid": pid_of(c.app), "shard": shard,
                        "lingering": c.lingering, "blocked": c.blocked,
                        "tx_bufs": s.tx_bufs, "tx_app": s.tx_app, "tx_engine": s.tx_engine + s.tx_returning,
                        "rx_bufs": s.rx_bufs, "rx_app": s.rx_app, "rx_engine": s.rx_engine, "rx_free": s.rx_free,
                        "tx_msgs": s.tx_msgs, "tx_bytes": s.tx_bytes, "rx_msgs": s.rx_msgs, "rx_bytes": s.rx_bytes,
                        "rx_full": s.rx_full, "refused": s.refused, "violations": s.violations_total(),
                    }));
                }
            }
            doc["channels"] = Value::Array(list);
        }
        if selector & STATS_FLOWS != 0 {
            let mut list = Vec::new();
            for (shard, r) in reports.iter().enumerate() {
                for f in &r.detail.flows {
                    let ch = r.detail.channels.iter().find(|c| c.owner == f.owner);
                    let t = &f.tuple;
                    list.push(json!({
                        "shard": shard,
                        "local": format!("{}:{}", t.local_ip, t.local_port),
                        "remote": format!("{}:{}", t.remote_ip, t.remote_port),
                        "state": format!("{:?}", f.state),
                        "channel": ch.map(|c| c.id),
                        "app": ch.map(|c| c.app),
                        "pid": ch.and_then(|c| pid_of(c.app)),
                        "cwnd": f.cwnd,
                        "srtt_us": f.srtt.as_secs_f64() * 1e6,
                        "min_rtt_us": f.min_rtt.as_secs_f64() * 1e6,
                        "in_flight": f.in_flight,
                        "queued": f.queued,
                        "legacy_peer": f.legacy_peer,
                        "acks_in_data": f.acks_in_data,
                        "retransmits": f.counters.retransmits,
                        "tx_msgs": f.counters.tx_messages, "tx_bytes": f.counters.tx_bytes,
                        "rx_msgs": f.counters.rx_messages, "rx_bytes": f.counters.rx_bytes,
                    }));
                }
            }
            doc["flows"] = Value::Array(list);
            // Who holds half-open flows (a SYN flood's sources), per shard, most first.
            let mut sources = Vec::new();
            for (shard, r) in reports.iter().enumerate() {
                for (ip, n) in &r.detail.half_open_sources {
                    sources.push(json!({"shard": shard, "ip": ip.to_string(), "half_open": n}));
                }
            }
            doc["half_open_sources"] = Value::Array(sources);
        }
        if selector & STATS_ARP != 0 {
            let mut list = Vec::new();
            for (shard, r) in reports.iter().enumerate() {
                for (ip, mac, st) in &r.detail.arp {
                    list.push(json!({"shard": shard, "ip": ip.to_string(), "mac": mac.to_string(), "static": st}));
                }
            }
            doc["arp"] = Value::Array(list);
        }
        doc
    }

    /// Channels served.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.channels).sum()
    }

    /// Registered applications.
    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    fn send(&mut self, shard: usize, cmd: ShardCmd) -> Result<(), Status> {
        let link = &self.shards[shard];
        link.cmds.send(cmd).map_err(|_| Status::Internal)?;
        link.waker.wake();
        Ok(())
    }

    /// Stops the capture, if any: the shards drop their taps; returns what was still waiting.
    fn stop_capture(&mut self) -> Option<CaptureSession> {
        let s = self.capture.take()?;
        for i in 0..self.shards.len() {
            let _ = self.send(i, ShardCmd::Capture(None));
        }
        log::info!("packet capture stopped ({} captures dropped)", s.readers.iter().map(|r| r.dropped()).sum::<u64>());
        Some(s)
    }

    /// The prefix (drops so far, packets) and pcapng blocks of up to `max` captured packets.
    fn capture_packets(s: &mut CaptureSession, head: Vec<u8>, max: usize) -> Vec<u8> {
        let mut body = head;
        let mut packets = 0;
        let offset = s.offset_ns;
        for (i, r) in s.readers.iter_mut().enumerate() {
            packets += r.drain(max - packets, |rec| capture::pcapng_packet(&mut body, i as u32, rec, offset));
        }
        let dropped: u64 = s.readers.iter().map(|r| r.dropped()).sum();
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&dropped.to_le_bytes());
        out.extend_from_slice(&(packets as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Refuses (counted, logged with the peer's credentials) a peer the access list does not
    /// allow to do `what`.
    fn admit(&mut self, cred: &PeerCred, what: &str, hint: &str) -> Result<(), Status> {
        if self.access.allows(cred) {
            return Ok(());
        }
        self.refused += 1;
        log::warn!(
            "{what} refused: pid {} uid {} gid {} is not on the access list{hint}",
            cred.pid,
            cred.uid,
            cred.gid
        );
        Err(Status::NotPermitted)
    }

    /// Tells every shard to reset its flows and stop.
    pub fn shutdown(&mut self) {
        for i in 0..self.shards.len() {
            let _ = self.send(i, ShardCmd::Shutdown);
        }
    }
}

impl CtrlHandler for Controller {
    fn register(&mut self, app: AppId, cred: PeerCred) -> Result<(), Status> {
        self.admit(&cred, "registration", " (machnet_rs.access)")?;
        log::info!("app {} registered: pid {} uid {} gid {}", app.0, cred.pid, cred.uid, cred.gid);
        self.apps.insert(app, App { cred, channels: Vec::new(), since: Instant::now() });
        Ok(())
    }

    fn stats(&mut self, cred: PeerCred, selector: u64) -> Result<Vec<u8>, Status> {
        self.admit(&cred, "statistics", "")?;
        serde_json::to_vec(&self.stats_json(selector)).map_err(|_| Status::Internal)
    }

    fn capture(&mut self, conn: AppId, cred: PeerCred, op: u64, args: [u8; 24]) -> Result<Vec<u8>, Status> {
        self.admit(&cred, "packet capture", "")?;
        match op {
            CAPTURE_START => {
                let (filter, snaplen) = capture::decode_args(&args).ok_or(Status::BadRequest)?;
                if self.capture.is_some() {
                    // One at a time: a second would halve what each sees.
                    return Err(Status::AddrInUse);
                }
                let now = machnet_net::time::Instant::from_nanos(machnet_runtime::clock::monotonic_ns());
                let mut readers = Vec::with_capacity(self.shards.len());
                for i in 0..self.shards.len() {
                    let (tap, reader) = capture::tap(filter, snaplen, now);
                    self.send(i, ShardCmd::Capture(Some(Box::new(tap))))?;
                    readers.push(reader);
                }
                let offset_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
                log::info!("packet capture started by pid {}: {filter:?}, snaplen {snaplen}", cred.pid);
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                let head = capture::pcapng_header(self.shards.len(), snaplen.min(capture::MAX_SNAPLEN), host.trim());
                let mut s = CaptureSession { conn, readers, offset_ns };
                let out = Self::capture_packets(&mut s, head, 0);
                self.capture = Some(s);
                Ok(out)
            }
            CAPTURE_READ | CAPTURE_STOP => {
                let Some(s) = self.capture.as_mut().filter(|s| s.conn == conn) else { return Err(Status::BadRequest) };
                let out = Self::capture_packets(s, Vec::new(), capture::READ_MAX);
                if op == CAPTURE_STOP {
                    self.stop_capture();
                }
                Ok(out)
            }
            _ => Err(Status::BadRequest),
        }
    }

    fn conn_closed(&mut self, conn: AppId) {
        if self.capture.as_ref().is_some_and(|s| s.conn == conn) {
            self.stop_capture();
        }
    }

    fn create_channel(&mut self, app: AppId) -> Result<ChannelGrant, Status> {
        if !self.apps.contains_key(&app) {
            return Err(Status::NotRegistered);
        }
        if self.channel_count() >= self.max_channels {
            log::warn!("app {}: channel refused, the daemon serves its maximum of {}", app.0, self.max_channels);
            return Err(Status::NoResources);
        }
        let held = self.apps.get(&app).map_or(0, |a| a.channels.len());
        if held >= self.max_channels_per_app {
            log::warn!(
                "app {}: channel refused, it has {held}, the most one application may have (channel.max_per_app)",
                app.0
            );
            return Err(Status::NoResources);
        }
        let id = self.next_channel;
        let name = format!("machnet-{id}");
        let (ch, fds) = match EngineChannel::create(&self.channel_cfg, &name, self.hugepages) {
            Ok(x) => x,
            Err(e) => {
                log::warn!("app {}: cannot create a channel: {e}", app.0);
                return Err(Status::NoResources);
            }
        };
        if !ch.is_hugepage_backed() {
            // Do not try hugepages again once they are unavailable: each failed try costs time.
            self.hugepages = false;
        }
        self.next_channel += 1;
        let shard = (0..self.shards.len()).min_by_key(|&i| self.shards[i].channels).expect("at least one shard");
        self.send(shard, ShardCmd::AddChannel(Box::new(ChannelSlot::new(id, app, ch))))?;
        self.shards[shard].channels += 1;
        let a = self.apps.get_mut(&app).expect("checked above");
        a.channels.push((id, shard));
        log::info!("app {} (pid {}): channel {id} on shard {shard}", app.0, a.cred.pid);
        Ok(ChannelGrant { id, fds })
    }

    fn detach_channel(&mut self, app: AppId, channel: u64) -> Result<(), Status> {
        let a = self.apps.get_mut(&app).ok_or(Status::NotRegistered)?;
        let pos = a.channels.iter().position(|&(id, _)| id == channel).ok_or(Status::NoSuchChannel)?;
        let (_, shard) = a.channels.swap_remove(pos);
        self.shards[shard].channels -= 1;
        self.send(shard, ShardCmd::RemoveChannel { id: channel, gone: false })
    }

    fn app_gone(&mut self, app: AppId) {
        let Some(a) = self.apps.remove(&app) else { return };
        log::info!("app {} (pid {}) gone: closing its {} channels", app.0, a.cred.pid, a.channels.len());
        for (id, shard) in a.channels {
            self.shards[shard].channels -= 1;
            let _ = self.send(shard, ShardCmd::RemoveChannel { id, gone: true });
        }
    }
}
