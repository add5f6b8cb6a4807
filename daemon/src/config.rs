//! Configuration: Machnet's `config.json`, accepted as is, plus our extension key.
//!
//! ```json
//! {
//!   "machnet_config": {
//!     "02:00:00:00:00:01": { "ip": "198.18.0.1", "engine_threads": 1, "cpu_mask": "0x1" }
//!   },
//!   "machnet_rs": {
//!     "backend": "udp",
//!     "udp": { "bind": "127.0.0.1:31001", "peers": ["127.0.0.1:31002"] }
//!   }
//! }
//! ```
//!
//! `machnet_config` maps one interface MAC to `ip` (required), `engine_threads` (number,
//! default 1), `cpu_mask` (hex string, default all CPUs) and `pcie` (PCI address, VMBus GUID or DPDK vdev
//! string). `machnet_rs` is optional; its keys are documented on [`Extension`] and in
//! `docs/operations.md`. Unknown keys anywhere are errors; every error names the file, the key
//! and the reason.

use machnet_net::wire::EthernetAddress;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default control socket path (the original's).
pub const DEFAULT_CTRL_SOCK: &str = "/var/run/machnet/machnet_ctrl.sock";

/// A configuration error: where, and why.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The key path (`machnet_rs.udp.bind`), empty for whole-file problems.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    machnet_config: BTreeMap<String, RawInterface>,
    #[serde(default)]
    machnet_rs: Option<Extension>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    ip: String,
    #[serde(default)]
    engine_threads: Option<u32>,
    #[serde(default)]
    cpu_mask: Option<String>,
    #[serde(default)]
    pcie: Option<String>,
}

/// Which NIC backend the daemon drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Frames tunnelled in kernel UDP datagrams (no privileges, no setup).
    #[default]
    Udp,
    /// A DPDK port (needs the `dpdk` cargo feature).
    Dpdk,
}

/// The UDP tunnel backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSection {
    /// Local tunnel address, `ip:port`.
    pub bind: String,
    /// Peers' tunnel addresses, `ip:port` (frames for unknown MACs go to all of them), or
    /// objects naming a multi-queue peer's queues and RSS key.
    #[serde(default)]
    pub peers: Vec<UdpPeerEntry>,
    /// The RSS key peers hash this daemon's frames with when it has several queues (hex, 16 to
    /// 64 bytes; default: the 40-byte Microsoft key).
    #[serde(default)]
    pub rss_key: Option<String>,
}

/// One peer of the UDP tunnel as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum UdpPeerEntry {
    /// `"ip:port"`: a single-queue peer.
    Addr(String),
    /// `{"addr": "ip:port", "queues": N, "rss_key": "hex"}`: a peer with N queues (on ports
    /// `port` .. `port + N - 1`) hashing with that key (default: the Microsoft key).
    Queues(UdpPeerQueues),
}

/// A multi-queue peer as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpPeerQueues {
    /// Its queue 0's tunnel address.
    pub addr: String,
    /// Its queues (its `engine_threads`), 1..=64.
    #[serde(default)]
    pub queues: Option<u16>,
    /// Its `udp.rss_key`.
    #[serde(default)]
    pub rss_key: Option<String>,
}

/// A validated peer of the UDP tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPeerConfig {
    /// Its queue 0's address.
    pub addr: SocketAddrV4,
    /// Its queues.
    pub queues: u16,
    /// Its RSS key.
    pub rss_key: Vec<u8>,
}

/// Parses an RSS key: hex digits, optionally separated by `:`, 16 to 64 bytes.
fn parse_rss_key(s: &str) -> Result<Vec<u8>, String> {
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    if digits.len() % 2 != 0 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not a hexadecimal key"));
    }
    let key: Vec<u8> =
        (0..digits.len() / 2).map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap()).collect();
    if !(16..=64).contains(&key.len()) {
        return Err(format!("{} bytes: expected 16 to 64 (most NICs use 40)", key.len()));
    }
    Ok(key)
}

/// Transport parameters (every key optional; defaults in `docs/protocol.md`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// Retransmission timeout floor, µs (1000).
    pub rto_min_us: Option<u64>,
    /// RTO before the first sample and for handshakes, µs (5000).
    pub rto_initial_us: Option<u64>,
    /// RTO cap, µs (100000).
    pub rto_max_us: Option<u64>,
    /// How long a peer may stay silent, while data waits for its acknowledgement, before the
    /// flow fails, ms (5000).
    pub peer_timeout_ms: Option<u64>,
    /// Also fail a flow after this many consecutive timeouts without an acknowledgement (unset:
    /// time alone decides, `peer_timeout_ms`).
    pub max_rto_retries: Option<u32>,
    /// SYN transmissions before a connect fails (9).
    pub syn_retries: Option<u32>,
    /// Cap of the handshake's backed-off timeout, µs (1000000).
    pub syn_rto_max_us: Option<u64>,
    /// `"swift"` (default) or `"fixed"`.
    pub cc: Option<String>,
    /// Window of the `"fixed"` algorithm, packets (32).
    pub fixed_window: Option<u32>,
    /// Swift's queueing-delay target at large windows, µs (25 on DPDK ports, 100 on the udp
    /// backend, whose kernel path adds tens of µs of jitter).
    pub swift_target_us: Option<u64>,
    /// Swift's extra target at small windows (flow scaling), µs (50; 100 on the udp backend).
    pub swift_fs_range_us: Option<u64>,
    /// Window (packets) below which delay alone never takes Swift (32, the original's fixed
    /// window; loss still can; 1: pure Swift).
    pub swift_delay_floor: Option<f64>,
    /// Receive window and send cap, packets, a power of two ≤ 256 (256).
    pub window: Option<usize>,
    /// Flows per shard (4096).
    pub max_flows: Option<usize>,
    /// Half-open flows (SYN received, handshake not finished) per shard; past it a new SYN
    /// evicts the oldest half-open flow (a quarter of `max_flows`).
    pub max_half_open: Option<usize>,
    /// Half-open flows from one remote IP per shard; its further SYNs are dropped (a quarter of
    /// `max_half_open`: 256).
    pub max_half_open_per_source: Option<usize>,
    /// Established and outgoing flows one application may hold per shard (`max_flows` less a
    /// sixteenth: 3840 of 4096).
    pub max_flows_per_app: Option<usize>,
    /// Carry acknowledgements in DATA between machnet-rs peers that both offer it (true).
    pub piggyback_acks: Option<bool>,
    /// How long an owed ACK may wait for DATA to carry it, µs (5; at most `rto_min_us` / 4).
    pub ack_delay_us: Option<u64>,
}

/// Shared-memory channel sizes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSection {
    /// Buffers per direction (12288: two 8 MiB messages each way).
    pub buffers: Option<u32>,
    /// Entries of each message ring (4096).
    pub ring_entries: Option<u32>,
    /// Most channels the daemon serves (256).
    pub max_channels: Option<usize>,
    /// Most channels one application may have (`max_channels` less a sixteenth: 240 of 256).
    pub max_per_app: Option<usize>,
    /// After an application detaches a channel, how long its flows may go without progress
    /// (nothing newly acknowledged) while they send what it queued before they are reset,
    /// ms (2000).
    pub linger_ms: Option<u64>,
    /// The most a detached channel's flows may take to send what it queued, progressing or
    /// not, ms (30000; at least `linger_ms`).
    pub linger_max_ms: Option<u64>,
    /// The same after an application died (its registration connection closed without a
    /// detach), ms (500; at most `linger_ms`): its peers learn of the death within a second.
    pub gone_linger_ms: Option<u64>,
}

/// ARP.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArpSection {
    /// Static entries: IP → MAC; never expire.
    #[serde(default)]
    pub r#static: BTreeMap<String, String>,
    /// Lifetime of learned entries, seconds (300).
    pub timeout_s: Option<u64>,
    /// Requests before a resolution fails (6).
    pub retries: Option<u32>,
    /// Interval between requests, ms (50).
    pub retry_ms: Option<u64>,
}

/// The DPDK backend.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpdkSection {
    /// The device: a PCI address (`0000:00:04.0`), a VMBus GUID for DPDK's netvsc PMD
    /// (Azure's synthetic NIC bound to `uio_hv_generic`), or a DPDK vdev string
    /// (`net_memif0,role=server,socket=/run/m.sock`); default: `machnet_config.<MAC>.pcie`.
    pub device: Option<String>,
    /// More EAL arguments, appended to machnetd's own (`--no-shconf --file-prefix <unique>
    /// --no-telemetry --log-level=error`, and `--no-huge -m <memory_mb> --no-pci` without
    /// hugepages, `--in-memory` with them).
    #[serde(default)]
    pub eal_args: Vec<String>,
    /// Use hugepages (default: yes for a PCI device, no for a vdev).
    pub hugepages: Option<bool>,
    /// Memory for DPDK without hugepages, MiB (256).
    pub memory_mb: Option<u32>,
    /// Packet buffers per queue (8191).
    pub mbufs_per_queue: Option<u32>,
    /// Receive descriptors per queue (1024, adjusted to the device's limits).
    pub rx_descriptors: Option<u16>,
    /// Transmit descriptors per queue (1024, adjusted to the device's limits).
    pub tx_descriptors: Option<u16>,
    /// IP MTU (1500).
    pub mtu: Option<u16>,
    /// How long to wait for the link at start-up, ms (10000; 0: do not wait).
    pub link_timeout_ms: Option<u64>,
    /// Longest DPDK start-up (EAL initialisation, device set-up and the link wait), ms; past
    /// it machnetd exits with an error naming the step it was in (default: the link timeout
    /// plus 20 s).
    pub start_timeout_ms: Option<u64>,
    /// Receive frames for every MAC (false).
    pub promiscuous: Option<bool>,
    /// Use the device's checksum offloads when it has them (true).
    pub checksum_offload: Option<bool>,
    /// Spread flows over the shards' queues with RSS when the device has it (true).
    pub rss: Option<bool>,
    /// memif only: the sender does the receiver's RSS, over one queue pair per (shard, peer
    /// shard), so that several shards on both sides get what a multi-queue RSS NIC would give
    /// them (docs/operations.md, "Shards, queues and steering": over memif).
    pub memif_steering: Option<MemifSteeringSection>,
}

/// `dpdk.memif_steering` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemifSteeringSection {
    /// The peer daemon's shards (its `engine_threads`), 1..=64.
    pub peer_queues: u16,
    /// The key the peer hashes this daemon's frames with (hex, 16 to 64 bytes; default: the
    /// 40-byte Microsoft key).
    pub rss_key: Option<String>,
    /// The peer's `rss_key`.
    pub peer_rss_key: Option<String>,
}

/// `dpdk.memif_steering`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemifSteering {
    /// The peer's shards.
    pub peer_queues: u16,
    /// This daemon's key.
    pub rss_key: Vec<u8>,
    /// The peer's key.
    pub peer_rss_key: Vec<u8>,
}

/// Fault injection on the port's transmit side (every shard), for testing applications on
/// an imperfect network. Probabilities are per frame, 0 to 1.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultSection {
    /// Frames dropped.
    #[serde(default)]
    pub loss: f64,
    /// Frames sent twice.
    #[serde(default)]
    pub duplicate: f64,
    /// Frames held back by `reorder_delay_us` (so later frames overtake them).
    #[serde(default)]
    pub reorder: f64,
    /// How long a reordered frame is held, µs (100).
    pub reorder_delay_us: Option<u64>,
    /// Frames with one byte flipped after the Ethernet header (checksums catch it).
    #[serde(default)]
    pub corrupt: f64,
    /// Delay added to every frame, µs (0).
    #[serde(default)]
    pub delay_us: u64,
    /// Random extra delay, uniform in [0, jitter_us) µs (0).
    #[serde(default)]
    pub jitter_us: u64,
    /// Seed of the generator (shard i uses seed + i; default: random).
    pub seed: Option<u64>,
}

/// Who may use the daemon.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// File mode of the control socket, octal (`"0660"`); default `"0666"`: every local user.
    pub socket_mode: Option<String>,
    /// Group owning the control socket: a name from /etc/group or a number.
    pub socket_group: Option<String>,
    /// Users allowed to register and read statistics (root always is). With both lists
    /// empty, everyone who can open the socket is.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Groups allowed (primary or supplementary).
    #[serde(default)]
    pub allow_gids: Vec<u32>,
}

/// A group's id from its name (`/etc/group`) or number.
pub fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok()).flatten()
    })
}

/// One numeric setting under `machnet_rs`: its key, the range the daemon can work with (the
/// same limits the code enforces later, so a value outside is refused at start instead of
/// failing every attach or connect), and how to read it.
pub struct NumericKey {
    /// Key path below `machnet_rs` (`transport.rto_min_us`).
    pub key: &'static str,
    /// Smallest value allowed.
    pub min: u64,
    /// Largest value allowed.
    pub max: u64,
    /// Only powers of two.
    pub pow2: bool,
    get: fn(&Extension) -> Option<f64>,
}

const fn num(key: &'static str, min: u64, max: u64, get: fn(&Extension) -> Option<f64>) -> NumericKey {
    NumericKey { key, min, max, pow2: false, get }
}

const fn pow2(key: &'static str, min: u64, max: u64, get: fn(&Extension) -> Option<f64>) -> NumericKey {
    NumericKey { key, min, max, pow2: true, get }
}

fn f<T: Into<f64>>(v: Option<T>) -> Option<f64> {
    v.map(Into::into)
}

fn fu(v: Option<u64>) -> Option<f64> {
    v.map(|x| x as f64)
}

fn fz(v: Option<usize>) -> Option<f64> {
    v.map(|x| x as f64)
}

/// Every numeric key of `machnet_rs` and its range (`docs/operations.md` lists them; a test
/// checks that each key there is here or named as non-numeric).
pub const NUMERIC_KEYS: &[NumericKey] = &[
    num("idle_spin_us", 0, 1_000_000, |e| fu(e.idle_spin_us)),
    num("idle_yield_us", 0, 1_000_000, |e| fu(e.idle_yield_us)),
    num("idle_max_park_us", 1, 1_000_000, |e| fu(e.idle_max_park_us)),
    num("transport.rto_min_us", 1, 10_000_000, |e| fu(e.transport.rto_min_us)),
    num("transport.rto_initial_us", 1, 10_000_000, |e| fu(e.transport.rto_initial_us)),
    num("transport.rto_max_us", 1, 60_000_000, |e| fu(e.transport.rto_max_us)),
    num("transport.peer_timeout_ms", 1, 3_600_000, |e| fu(e.transport.peer_timeout_ms)),
    num("transport.max_rto_retries", 1, 1000, |e| f(e.transport.max_rto_retries)),
    num("transport.syn_retries", 1, 64, |e| f(e.transport.syn_retries)),
    num("transport.syn_rto_max_us", 1, 60_000_000, |e| fu(e.transport.syn_rto_max_us)),
    num("transport.fixed_window", 1, 256, |e| f(e.transport.fixed_window)),
    num("transport.swift_target_us", 1, 1_000_000, |e| fu(e.transport.swift_target_us)),
    num("transport.swift_fs_range_us", 0, 1_000_000, |e| fu(e.transport.swift_fs_range_us)),
    num("transport.swift_delay_floor", 1, 256, |e| e.transport.swift_delay_floor),
    pow2("transport.window", 1, 256, |e| fz(e.transport.window)),
    num("transport.max_flows", 1, 65_536, |e| fz(e.transport.max_flows)),
    num("transport.max_half_open", 1, 65_536, |e| fz(e.transport.max_half_open)),
    num("transport.max_half_open_per_source", 1, 65_536, |e| fz(e.transport.max_half_open_per_source)),
    num("transport.max_flows_per_app", 1, 65_536, |e| fz(e.transport.max_flows_per_app)),
    num("transport.ack_delay_us", 0, 2_500_000, |e| fu(e.transport.ack_delay_us)),
    num("channel.buffers", 64, 1 << 20, |e| f(e.channel.buffers)),
    pow2("channel.ring_entries", 16, 1 << 20, |e| f(e.channel.ring_entries)),
    num("channel.max_channels", 1, 1024, |e| fz(e.channel.max_channels)),
    num("channel.max_per_app", 1, 1024, |e| fz(e.channel.max_per_app)),
    num("channel.linger_ms", 0, 600_000, |e| fu(e.channel.linger_ms)),
    num("channel.linger_max_ms", 0, 3_600_000, |e| fu(e.channel.linger_max_ms)),
    num("channel.gone_linger_ms", 0, 600_000, |e| fu(e.channel.gone_linger_ms)),
    num("arp.timeout_s", 1, 86_400, |e| fu(e.arp.timeout_s)),
    num("arp.retries", 1, 20, |e| f(e.arp.retries)),
    num("arp.retry_ms", 1, 10_000, |e| fu(e.arp.retry_ms)),
    num("dpdk.memory_mb", 64, 1 << 20, |e| f(e.dpdk.as_ref()?.memory_mb)),
    num("dpdk.mbufs_per_queue", 1024, 1 << 20, |e| f(e.dpdk.as_ref()?.mbufs_per_queue)),
    num("dpdk.rx_descriptors", 64, 32_768, |e| f(e.dpdk.as_ref()?.rx_descriptors)),
    num("dpdk.tx_descriptors", 64, 32_768, |e| f(e.dpdk.as_ref()?.tx_descriptors)),
    num("dpdk.mtu", 576, 9000, |e| f(e.dpdk.as_ref()?.mtu)),
    num("dpdk.link_timeout_ms", 0, 600_000, |e| fu(e.dpdk.as_ref()?.link_timeout_ms)),
    num("dpdk.start_timeout_ms", 100, 3_600_000, |e| fu(e.dpdk.as_ref()?.start_timeout_ms)),
    num("fault.reorder_delay_us", 0, 1_000_000, |e| fu(e.fault.as_ref()?.reorder_delay_us)),
    num("fault.delay_us", 0, 1_000_000, |e| fu(Some(e.fault.as_ref()?.delay_us))),
    num("fault.jitter_us", 0, 1_000_000, |e| fu(Some(e.fault.as_ref()?.jitter_us))),
];

impl NumericKey {
    /// `Err(reason)` if `ext` sets this key outside its range.
    fn check(&self, ext: &Extension) -> Result<(), String> {
        let Some(v) = (self.get)(ext) else { return Ok(()) };
        let int = |x: f64| if x.fract() == 0.0 { format!("{}", x as i128) } else { format!("{x}") };
        let (lo, hi) = (self.min as f64, self.max as f64);
        let in_range = v >= lo && v <= hi && (!self.pow2 || (v.fract() == 0.0 && (v as u64).is_power_of_two()));
        if in_range {
            return Ok(());
        }
        let what = if self.pow2 { "a power of two in" } else { "in" };
        Err(format!("{} is out of range: expected {what} {}..={}", int(v), self.min, self.max))
    }
}

/// Our extension key, `machnet_rs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// `"udp"` or `"dpdk"` as written; see [`Extension::backend`].
    #[serde(default, rename = "backend")]
    backend_key: Option<Backend>,
    /// The backend: as given, else `"udp"` if a `"udp"` section is present, else `"dpdk"` — so
    /// the original's `config.json`, which has no `machnet_rs` at all, means its DPDK NIC.
    #[serde(skip)]
    pub backend: Backend,
    /// UDP backend settings (required with `"udp"`).
    pub udp: Option<UdpSection>,
    /// DPDK backend settings.
    pub dpdk: Option<DpdkSection>,
    /// Fault injection on transmit (off unless present).
    pub fault: Option<FaultSection>,
    /// Access control.
    #[serde(default)]
    pub access: AccessSection,
    /// `"busy"` or `"adaptive"`; default: busy when there are more CPUs than shards, else
    /// adaptive.
    pub idle: Option<String>,
    /// Adaptive idle: µs of spinning before yielding (50).
    pub idle_spin_us: Option<u64>,
    /// Adaptive idle: further µs of `sched_yield` before parking (200).
    pub idle_yield_us: Option<u64>,
    /// Adaptive idle: longest single park, µs (100000; 50 on ports that cannot wake a parked
    /// shard, such as DPDK devices, where parks are short sleeps between polls).
    pub idle_max_park_us: Option<u64>,
    /// Control socket path (the `--ctrl-sock` flag overrides it).
    pub ctrl_sock: Option<String>,
    /// Where to serve Prometheus metrics, `ip:port` or a port on 127.0.0.1 (the
    /// `--metrics-addr` flag overrides it); off when absent.
    pub metrics_addr: Option<String>,
    /// Transport parameters.
    #[serde(default)]
    pub transport: TransportSection,
    /// Channel sizes.
    #[serde(default)]
    pub channel: ChannelSection,
    /// ARP.
    #[serde(default)]
    pub arp: ArpSection,
    /// Skip software verification of received checksums (for peers whose NICs mangle the UDP
    /// checksum; default false).
    #[serde(default)]
    pub no_rx_checksum: bool,
}

/// The metrics address: `ip:port`, or a bare port on 127.0.0.1 (port 0: any free port).
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse().map_err(|_| format!("{s:?} is not an ip:port (or a port on 127.0.0.1)"))
}

/// The PCI address (`PCI_SLOT_NAME` of `device/uevent`) of the interface under `sys_net`
/// (`/sys/class/net`) whose `address` is `mac`, as the original Machnet finds its NIC.
pub fn pci_of_mac(sys_net: &Path, mac: &EthernetAddress) -> Option<String> {
    for entry in std::fs::read_dir(sys_net).ok()?.flatten() {
        let dir = entry.path();
        let Ok(addr) = std::fs::read_to_string(dir.join("address")) else { continue };
        if addr.trim().parse::<EthernetAddress>().ok() != Some(*mac) {
            continue;
        }
        let Ok(uevent) = std::fs::read_to_string(dir.join("device/uevent")) else { continue };
        if let Some(slot) = uevent.lines().find_map(|l| l.strip_prefix("PCI_SLOT_NAME=")) {
            return Some(slot.trim().to_string());
        }
    }
    None
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// Interface MAC.
    pub mac: EthernetAddress,
    /// The IPv4 address the daemon owns.
    pub ip: Ipv4Addr,
    /// Engine shards.
    pub engine_threads: u32,
    /// CPUs the shards may run on (bit i = CPU i); shards are pinned to these in order.
    pub cpu_mask: Option<u64>,
    /// PCI address or vdev string from `machnet_config`.
    pub pcie: Option<String>,
    /// The DPDK device to open (validated: present with the dpdk backend).
    pub dpdk_device: Option<String>,
    /// Extension settings.
    pub ext: Extension,
    /// UDP tunnel endpoints, parsed.
    pub udp_bind: Option<SocketAddrV4>,
    /// UDP peers, parsed.
    pub udp_peers: Vec<UdpPeerConfig>,
    /// The RSS key of this daemon's tunnel queues.
    pub udp_rss_key: Vec<u8>,
    /// `dpdk.memif_steering`, validated.
    pub memif_steering: Option<MemifSteering>,
    /// Static ARP entries, parsed.
    pub static_arp: Vec<(Ipv4Addr, EthernetAddress)>,
    /// `machnet_rs.metrics_addr`, parsed.
    pub metrics_addr: Option<SocketAddr>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.into(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates configuration text (as if read from `path`).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: path.into(), key: key.into(), reason };
        let raw: RawFile = serde_json::from_str(text).map_err(|e| {
            // serde names the offending key in its message ("unknown field `x`, expected …").
            err("", format!("invalid configuration: {e}"))
        })?;
        if raw.machnet_config.is_empty() {
            return Err(err("machnet_config", "no interface configured".into()));
        }
        if raw.machnet_config.len() > 1 {
            return Err(err(
                "machnet_config",
                format!(
                    "machnetd serves one interface per daemon; found {} (run one daemon per NIC)",
                    raw.machnet_config.len()
                ),
            ));
        }
        let (mac_s, iface) = raw.machnet_config.into_iter().next().expect("one entry");
        let key = |k: &str| format!("machnet_config.{mac_s}.{k}");
        let mac: EthernetAddress =
            mac_s.parse().map_err(|e| err(&format!("machnet_config.{mac_s}"), format!("bad MAC address: {e}")))?;
        if !mac.is_unicast() || mac == EthernetAddress::ZERO {
            return Err(err(&format!("machnet_config.{mac_s}"), "MAC must be a unicast, non-zero address".into()));
        }
        let ip: Ipv4Addr =
            iface.ip.parse().map_err(|_| err(&key("ip"), format!("{:?} is not an IPv4 address", iface.ip)))?;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(err(&key("ip"), format!("{ip} cannot be an interface address")));
        }
        let engine_threads = iface.engine_threads.unwrap_or(1);
        if !(1..=64).contains(&engine_threads) {
            return Err(err(&key("engine_threads"), format!("{engine_threads} is out of range: expected in 1..=64")));
        }
        let cpu_mask = match &iface.cpu_mask {
            None => None,
            Some(s) => {
                let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
                let m = u64::from_str_radix(hex, 16)
                    .map_err(|_| err(&key("cpu_mask"), format!("{s:?} is not a hexadecimal mask")))?;
                if m == 0 {
                    return Err(err(&key("cpu_mask"), "mask selects no CPU".into()));
                }
                Some(m)
            }
        };
        let mut ext = raw.machnet_rs.unwrap_or_default();
        ext.backend = ext.backend_key.unwrap_or(if ext.udp.is_some() { Backend::Udp } else { Backend::Dpdk });
        let mut udp_bind = None;
        let mut udp_peers = Vec::new();
        let mut udp_rss_key = machnet_net::rss::MICROSOFT_KEY.to_vec();
        match ext.backend {
            Backend::Udp => {
                let udp = ext.udp.as_ref().ok_or_else(|| {
                    err(
                        "machnet_rs.udp",
                        "the udp backend needs \"udp\": {\"bind\": \"ip:port\", \"peers\": [...]}".into(),
                    )
                })?;
                udp_bind = Some(
                    udp.bind
                        .parse()
                        .map_err(|_| err("machnet_rs.udp.bind", format!("{:?} is not an IPv4 ip:port", udp.bind)))?,
                );
                if let Some(k) = &udp.rss_key {
                    udp_rss_key = parse_rss_key(k).map_err(|e| err("machnet_rs.udp.rss_key", e))?;
                }
                for (i, p) in udp.peers.iter().enumerate() {
                    let at = format!("machnet_rs.udp.peers[{i}]");
                    let (addr, queues, rss_key) = match p {
                        UdpPeerEntry::Addr(a) => (a, None, None),
                        UdpPeerEntry::Queues(q) => (&q.addr, q.queues, q.rss_key.as_ref()),
                    };
                    let addr: SocketAddrV4 =
                        addr.parse().map_err(|_| err(&at, format!("{addr:?} is not an IPv4 ip:port")))?;
                    let queues = queues.unwrap_or(1);
                    if !(1..=64).contains(&queues) || u32::from(addr.port()) + u32::from(queues) > 65536 {
                        return Err(err(
                            &format!("{at}.queues"),
                            format!("{queues} is out of range: expected in 1..=64, ports up to 65535"),
                        ));
                    }
                    let rss_key = match rss_key {
                        Some(k) => parse_rss_key(k).map_err(|e| err(&format!("{at}.rss_key"), e))?,
                        None => machnet_net::rss::MICROSOFT_KEY.to_vec(),
                    };
                    udp_peers.push(UdpPeerConfig { addr, queues, rss_key });
                }
            }
            Backend::Dpdk => {
                if ext.udp.is_some() {
                    return Err(err("machnet_rs.udp", "only meaningful with \"backend\": \"udp\"".into()));
                }
            }
        }
        let dpdk_device = match ext.backend {
            Backend::Udp => {
                if ext.dpdk.is_some() {
                    return Err(err("machnet_rs.dpdk", "only meaningful with \"backend\": \"dpdk\"".into()));
                }
                None
            }
            Backend::Dpdk => {
                let d = ext.dpdk.as_ref().and_then(|d| d.device.as_ref());
                match (d, iface.pcie.as_ref()) {
                    (Some(d), Some(p)) if d != p => {
                        return Err(err(
                            "machnet_rs.dpdk.device",
                            format!("{d:?} differs from machnet_config.{mac_s}.pcie {p:?}: give the device once"),
                        ))
                    }
                    (Some(d), _) | (None, Some(d)) => {
                        if d.trim().is_empty() {
                            return Err(err("machnet_rs.dpdk.device", "empty device string".into()));
                        }
                        Some(d.clone())
                    }
                    // As the original: the PCI address of the kernel interface with this MAC.
                    (None, None) => match pci_of_mac(Path::new("/sys/class/net"), &mac) {
                        Some(pci) => Some(pci),
                        None => return Err(err(
                            &key("pcie"),
                            format!("the dpdk backend needs a device: no PCI network interface has MAC {mac}; give a PCI address or vdev string in \"pcie\" or in \"machnet_rs\": {{\"dpdk\": {{\"device\": ...}}}}"),
                        )),
                    },
                }
            }
        };
        for k in NUMERIC_KEYS {
            k.check(&ext).map_err(|why| err(&format!("machnet_rs.{}", k.key), why))?;
        }
        // Ranges that depend on other keys.
        let c = &ext.channel;
        let max_channels = c.max_channels.unwrap_or(256);
        if let Some(n) = c.max_per_app.filter(|&n| n > max_channels) {
            return Err(err(
                "machnet_rs.channel.max_per_app",
                format!("{n} is out of range: expected in 1..={max_channels} (channel.max_channels)"),
            ));
        }
        let linger = c.linger_ms.unwrap_or(2000);
        if let Some(m) = c.linger_max_ms.filter(|&m| m < linger) {
            return Err(err(
                "machnet_rs.channel.linger_max_ms",
                format!("{m} is out of range: expected in {linger}..=3600000 (at least channel.linger_ms)"),
            ));
        }
        if let Some(g) = c.gone_linger_ms.filter(|&g| g > linger) {
            return Err(err(
                "machnet_rs.channel.gone_linger_ms",
                format!("{g} is out of range: expected in 0..={linger} (channel.linger_ms)"),
            ));
        }
        if udp_bind.is_some_and(|b: SocketAddrV4| b.port() == 0) {
            return Err(err("machnet_rs.udp.bind", "port 0: give the port the peers send to".into()));
        }
        if udp_bind.is_some_and(|b: SocketAddrV4| u32::from(b.port()) + engine_threads > 65536) {
            return Err(err(
                "machnet_rs.udp.bind",
                format!("queue i binds this port + i: {engine_threads} queues pass port 65535"),
            ));
        }
        if let Some(m) = &ext.access.socket_mode {
            let ok = u32::from_str_radix(m.trim_start_matches("0o"), 8).is_ok_and(|v| v <= 0o777);
            if !ok {
                return Err(err(
                    "machnet_rs.access.socket_mode",
                    format!("{m:?} is not an octal file mode like \"0660\""),
                ));
            }
        }
        if let Some(g) = &ext.access.socket_group {
            if group_id(g).is_none() {
                return Err(err("machnet_rs.access.socket_group", format!("no group {g:?} (not in /etc/group)")));
            }
        }
        if let Some(f) = &ext.fault {
            for (name, p) in
                [("loss", f.loss), ("duplicate", f.duplicate), ("reorder", f.reorder), ("corrupt", f.corrupt)]
            {
                if !(0.0..=1.0).contains(&p) {
                    return Err(err(&format!("machnet_rs.fault.{name}"), format!("{p} is not a probability (0 to 1)")));
                }
            }
        }
        if let Some(idle) = &ext.idle {
            if idle != "busy" && idle != "adaptive" {
                return Err(err("machnet_rs.idle", format!("{idle:?}: expected \"busy\" or \"adaptive\"")));
            }
        }
        if let Some(cc) = &ext.transport.cc {
            if cc != "swift" && cc != "fixed" {
                return Err(err("machnet_rs.transport.cc", format!("{cc:?}: expected \"swift\" or \"fixed\"")));
            }
        }
        let mut static_arp = Vec::new();
        for (ip_s, mac_s) in &ext.arp.r#static {
            let k = format!("machnet_rs.arp.static.{ip_s}");
            let ip: Ipv4Addr = ip_s.parse().map_err(|_| err(&k, format!("{ip_s:?} is not an IPv4 address")))?;
            let m: EthernetAddress = mac_s.parse().map_err(|e| err(&k, format!("bad MAC {mac_s:?}: {e}")))?;
            static_arp.push((ip, m));
        }
        let memif_steering = match ext.dpdk.as_ref().and_then(|d| d.memif_steering.as_ref()) {
            None => None,
            Some(m) => {
                let at = "machnet_rs.dpdk.memif_steering";
                if !dpdk_device.as_deref().is_some_and(|d| d.trim_start().starts_with("net_memif")) {
                    return Err(err(
                        at,
                        "only for a net_memif device (memif carries the sender's queue index to the peer)".into(),
                    ));
                }
                if !(1..=64).contains(&m.peer_queues) {
                    return Err(err(
                        &format!("{at}.peer_queues"),
                        format!("{} is out of range: expected in 1..=64 (the peer's engine_threads)", m.peer_queues),
                    ));
                }
                let key = |k: &Option<String>, name: &str| match k {
                    Some(k) => parse_rss_key(k).map_err(|e| err(&format!("{at}.{name}"), e)),
                    None => Ok(machnet_net::rss::MICROSOFT_KEY.to_vec()),
                };
                Some(MemifSteering {
                    peer_queues: m.peer_queues,
                    rss_key: key(&m.rss_key, "rss_key")?,
                    peer_rss_key: key(&m.peer_rss_key, "peer_rss_key")?,
                })
            }
        };
        let metrics_addr = match &ext.metrics_addr {
            Some(a) => Some(parse_metrics_addr(a).map_err(|why| err("machnet_rs.metrics_addr", why))?),
            None => None,
        };
        let cfg = Config {
            file: path.into(),
            mac,
            ip,
            engine_threads,
            cpu_mask,
            pcie: iface.pcie,
            dpdk_device,
            ext,
            udp_bind,
            udp_peers,
            udp_rss_key,
            memif_steering,
            static_arp,
            metrics_addr,
        };
        cfg.transport().validate().map_err(|e| err("machnet_rs.transport", e.to_string()))?;
        Ok(cfg)
    }

    /// Transport parameters with the extension's overrides applied.
    pub fn transport(&self) -> machnet_transport::Config {
        use machnet_transport::cc::{CcConfig, SwiftParams};
        let t = &self.ext.transport;
        let d = machnet_transport::Config::default();
        let us = |v: Option<u64>, dflt: Duration| v.map_or(dflt, Duration::from_micros);
        let c = machnet_transport::Config {
            rto_min: us(t.rto_min_us, d.rto_min),
            rto_initial: us(t.rto_initial_us, d.rto_initial),
            rto_max: us(t.rto_max_us, d.rto_max),
            peer_timeout: t.peer_timeout_ms.map_or(d.peer_timeout, Duration::from_millis),
            max_rto_retries: t.max_rto_retries.or(d.max_rto_retries),
            syn_retries: t.syn_retries.unwrap_or(d.syn_retries),
            syn_rto_max: us(t.syn_rto_max_us, d.syn_rto_max),
            cc: match t.cc.as_deref() {
                Some("fixed") => CcConfig::Fixed { window: t.fixed_window.unwrap_or(32) },
                _ => {
                    let udp = self.ext.backend == Backend::Udp;
                    let d = SwiftParams::default();
                    let us = |v: Option<u64>, udp_default: u64, dflt: Duration| {
                        v.map_or(if udp { Duration::from_micros(udp_default) } else { dflt }, Duration::from_micros)
                    };
                    CcConfig::Swift(SwiftParams {
                        base_target: us(t.swift_target_us, 100, d.base_target),
                        fs_range: us(t.swift_fs_range_us, 100, d.fs_range),
                        delay_floor: t.swift_delay_floor.unwrap_or(d.delay_floor),
                        ..d
                    })
                }
            },
            window: t.window.unwrap_or(d.window),
            ..d.with_max_flows(t.max_flows.unwrap_or(d.max_flows))
        };
        machnet_transport::Config {
            max_half_open: t.max_half_open.unwrap_or(c.max_half_open),
            max_half_open_per_source: t.max_half_open_per_source.unwrap_or(c.max_half_open_per_source),
            max_flows_per_group: t.max_flows_per_app.unwrap_or(c.max_flows_per_group),
            piggyback_acks: t.piggyback_acks.unwrap_or(c.piggyback_acks),
            ack_delay: us(t.ack_delay_us, c.ack_delay),
            ..c
        }
    }

    /// Most channels the daemon serves.
    pub fn max_channels(&self) -> usize {
        self.ext.channel.max_channels.unwrap_or(256)
    }

    /// Most channels one application may have.
    pub fn max_channels_per_app(&self) -> usize {
        let n = self.max_channels();
        self.ext.channel.max_per_app.unwrap_or(n.saturating_sub((n / 16).max(1)).max(1))
    }

    /// The control socket's file mode.
    pub fn socket_mode(&self) -> u32 {
        self.ext
            .access
            .socket_mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8).ok())
            .unwrap_or(0o666)
    }

    /// CPUs selected by `cpu_mask`, in order.
    pub fn cpus(&self) -> Vec<usize> {
        match self.cpu_mask {
            None => Vec::new(),
            Some(m) => (0..64).filter(|i| m & (1 << i) != 0).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/machnet/test.json"), text)
    }

    #[test]
    fn memif_steering_is_validated() {
        let dpdk = |device: &str, steering: &str| {
            parse(&format!(
                r#"{{"machnet_config": {{"02:00:00:00:00:01": {{"ip": "198.18.0.1", "engine_threads": 2}}}},
                   "machnet_rs": {{"backend": "dpdk", "dpdk": {{"device": "{device}", "memif_steering": {steering}}}}}}}"#
            ))
        };
        let memif = "net_memif0,role=server,socket=/tmp/m.sock";
        let c = dpdk(memif, r#"{"peer_queues": 3, "peer_rss_key": "ffffffffffffffffffffffffffffffff"}"#).unwrap();
        assert_eq!(
            c.memif_steering,
            Some(MemifSteering {
                peer_queues: 3,
                rss_key: machnet_net::rss::MICROSOFT_KEY.to_vec(),
                peer_rss_key: vec![0xff; 16]
            })
        );
        for (device, steering, key, reason) in [
            ("0000:00:04.0", r#"{"peer_queues": 2}"#, "machnet_rs.dpdk.memif_steering", "only for a net_memif device"),
            (memif, r#"{"peer_queues": 0}"#, "machnet_rs.dpdk.memif_steering.peer_queues", "out of range"),
            (memif, r#"{"peer_queues": 65}"#, "machnet_rs.dpdk.memif_steering.peer_queues", "out of range"),
            (memif, r#"{"peer_queues": 2, "rss_key": "00"}"#, "machnet_rs.dpdk.memif_steering.rss_key", "1 bytes"),
            (
                memif,
                r#"{"peer_queues": 2, "peer_rss_key": "xy"}"#,
                "machnet_rs.dpdk.memif_steering.peer_rss_key",
                "hexadecimal",
            ),
            (memif, r#"{"rss_key": "00"}"#, "", "peer_queues"),
        ] {
            let e = dpdk(device, steering).unwrap_err();
            assert_eq!(e.key, key, "{steering}: {e}");
            assert!(e.reason.contains(reason), "{steering}: {e}");
        }
    }

    #[test]
    fn udp_queues_peers_and_rss_keys() {
        let c = parse(
            r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1", "engine_threads": 3}},
               "machnet_rs": {"udp": {"bind": "127.0.0.1:31001", "rss_key": "00:01:02:03:04:05:06:07:08:09:0a:0b:0c:0d:0e:0f",
                              "peers": ["127.0.0.1:31010", {"addr": "127.0.0.1:31002", "queues": 2},
                                        {"addr": "127.0.0.1:31020", "queues": 4, "rss_key": "ffffffffffffffffffffffffffffffff"}]}}}"#,
        )
        .unwrap();
        assert_eq!(c.engine_threads, 3);
        assert_eq!(c.udp_rss_key, (0..16).collect::<Vec<u8>>());
        let m = machnet_net::rss::MICROSOFT_KEY.to_vec();
        let a = |p: u16| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
        assert_eq!(
            c.udp_peers,
            vec![
                UdpPeerConfig { addr: a(31010), queues: 1, rss_key: m.clone() },
                UdpPeerConfig { addr: a(31002), queues: 2, rss_key: m },
                UdpPeerConfig { addr: a(31020), queues: 4, rss_key: vec![0xff; 16] },
            ]
        );
        let udp = |iface: &str, udp: &str| {
            parse(&format!(
                r#"{{"machnet_config": {{"02:00:00:00:00:01": {{"ip": "198.18.0.1"{iface}}}}}, "machnet_rs": {{"udp": {udp}}}}}"#
            ))
            .unwrap_err()
        };
        for (iface, section, key, reason) in [
            ("", r#"{"bind": "127.0.0.1:1", "rss_key": "abc"}"#, "machnet_rs.udp.rss_key", "not a hexadecimal key"),
            ("", r#"{"bind": "127.0.0.1:1", "rss_key": "0011"}"#, "machnet_rs.udp.rss_key", "2 bytes"),
            (
                "",
                r#"{"bind": "127.0.0.1:1", "peers": [{"addr": "127.0.0.1:2", "queues": 0}]}"#,
                "machnet_rs.udp.peers[0].queues",
                "out of range",
            ),
            (
                "",
                r#"{"bind": "127.0.0.1:1", "peers": [{"addr": "127.0.0.1:65535", "queues": 2}]}"#,
                "machnet_rs.udp.peers[0].queues",
                "out of range",
            ),
            (
                "",
                r#"{"bind": "127.0.0.1:1", "peers": ["x", {"addr": "127.0.0.1:2", "rss_key": "zz"}]}"#,
                "machnet_rs.udp.peers[0]",
                "not an IPv4",
            ),
            (r#", "engine_threads": 2"#, r#"{"bind": "127.0.0.1:65535"}"#, "machnet_rs.udp.bind", "pass port 65535"),
        ] {
            let e = udp(iface, section);
            assert_eq!(e.key, key, "{section}: {e}");
            assert!(e.reason.contains(reason), "{section}: {e}");
        }
    }

    #[test]
    fn original_schema_with_udp_extension() {
        let c = parse(
            r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1", "engine_threads": 1, "cpu_mask": "0x2"}},
               "machnet_rs": {"backend": "udp", "udp": {"bind": "127.0.0.1:31001", "peers": ["127.0.0.1:31002"]},
                              "transport": {"rto_min_us": 500, "cc": "fixed"}, "arp": {"static": {"198.18.0.2": "02:00:00:00:00:02"}}}}"#,
        )
        .unwrap();
        assert_eq!(c.ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(c.cpus(), vec![1]);
        assert_eq!(c.udp_peers.len(), 1);
        assert_eq!(c.transport().rto_min, Duration::from_micros(500));
        assert_eq!(c.transport().cc, machnet_transport::cc::CcConfig::Fixed { window: 32 });
        assert_eq!(c.static_arp, vec![(Ipv4Addr::new(198, 18, 0, 2), EthernetAddress([2, 0, 0, 0, 0, 2]))]);
    }

    #[test]
    fn the_originals_shipped_example_is_accepted_for_dpdk() {
        let c = parse(r#"{"machnet_config": {"00:11:22:33:44:55": {"ip": "172.17.0.1", "engine_threads": 1, "pcie": "0000:00:05.0"}}, "machnet_rs": {"backend": "dpdk"}}"#).unwrap();
        assert_eq!(c.engine_threads, 1);
        assert_eq!(c.dpdk_device.as_deref(), Some("0000:00:05.0"));
        let c = parse(
            r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1", "engine_threads": 2}},
               "machnet_rs": {"backend": "dpdk", "dpdk": {"device": "net_memif0,role=server", "mtu": 1500},
                              "fault": {"loss": 0.05, "reorder": 0.05, "duplicate": 0.01, "seed": 7}}}"#,
        )
        .unwrap();
        assert_eq!(c.dpdk_device.as_deref(), Some("net_memif0,role=server"));
        assert_eq!(c.engine_threads, 2);
        let f = c.ext.fault.as_ref().unwrap();
        assert_eq!((f.loss, f.reorder, f.duplicate, f.seed), (0.05, 0.05, 0.01, Some(7)));
    }

    #[test]
    fn the_shipped_sample_configuration_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/config.json");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.ext.backend, Backend::Dpdk);
        assert_eq!(c.engine_threads, 2);
        assert_eq!(c.socket_mode(), 0o666);
    }

    #[test]
    fn pci_address_is_found_by_mac_as_the_original_does() {
        let root = std::env::temp_dir().join(format!("machnet-sysfs-{}", std::process::id()));
        let eth1 = root.join("eth1");
        std::fs::create_dir_all(eth1.join("device")).unwrap();
        std::fs::create_dir_all(root.join("lo")).unwrap();
        std::fs::write(root.join("lo/address"), "00:00:00:00:00:00\n").unwrap();
        std::fs::write(eth1.join("address"), "00:0d:3a:AA:bb:01\n").unwrap();
        std::fs::write(eth1.join("device/uevent"), "DRIVER=mlx5_core\nPCI_SLOT_NAME=0002:00:02.0\n").unwrap();
        let mac: EthernetAddress = "00:0d:3a:aa:bb:01".parse().unwrap();
        assert_eq!(pci_of_mac(&root, &mac).as_deref(), Some("0002:00:02.0"));
        assert_eq!(pci_of_mac(&root, &"00:0d:3a:aa:bb:02".parse().unwrap()), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A configuration (DPDK backend, so every section is allowed) with `key` (below
    /// `machnet_rs`) set to `value`.
    fn with_key(key: &str, value: serde_json::Value) -> String {
        let mut doc = serde_json::json!({
            "machnet_config": {"02:00:00:00:00:01": {"ip": "198.18.0.1"}},
            "machnet_rs": {"backend": "dpdk", "dpdk": {"device": "net_null0"}, "fault": {}},
        });
        let mut at = &mut doc["machnet_rs"];
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            if at.get(*p).is_none() {
                at[*p] = serde_json::json!({});
            }
            at = &mut at[*p];
        }
        at[*parts.last().unwrap()] = value;
        doc.to_string()
    }

    /// Every numeric key: a value below its range and one above are refused at start, with
    /// the file, the key, the value and the range in the error; its bounds themselves pass the
    /// range check; powers of two are enforced where the code needs them.
    #[test]
    fn every_numeric_key_is_range_checked_at_start() {
        // Their upper bounds depend on another key (checked separately below).
        let relational = ["channel.max_per_app", "channel.gone_linger_ms", "channel.linger_max_ms"];
        for k in NUMERIC_KEYS {
            let path = format!("machnet_rs.{}", k.key);
            let mut bad = vec![k.max + 1];
            if k.min > 0 {
                bad.push(k.min - 1);
            }
            if k.pow2 && k.max > 2 {
                bad.push(k.min.max(2) + 1);
            }
            for v in bad {
                let e = parse(&with_key(k.key, v.into())).err().unwrap_or_else(|| panic!("{path} = {v} accepted"));
                let text = e.to_string();
                assert_eq!(e.key, path, "{text}");
                assert!(text.starts_with("/etc/machnet/test.json: "), "{text}");
                assert!(text.contains(&format!("{v} is out of range")), "{text}");
                if !relational.contains(&k.key) {
                    assert!(text.contains(&format!("{}..={}", k.min, k.max)), "{text}");
                }
            }
            for v in [k.min, k.max] {
                // An upper bound from another key, or (linger_max_ms) a lower one.
                if relational.contains(&k.key) && (v == k.max || k.key == "channel.linger_max_ms") {
                    continue;
                }
                if let Err(e) = parse(&with_key(k.key, v.into())) {
                    // Another rule may object (rto_min above rto_max, ...), never the range.
                    assert!(!(e.key == path && e.reason.contains("out of range")), "{path} = {v}: {e}");
                }
            }
        }
        let e = parse(&with_key("channel.max_per_app", 300.into())).unwrap_err();
        assert!(e.to_string().contains("300 is out of range: expected in 1..=256 (channel.max_channels)"), "{e}");
        let e = parse(&with_key("channel.gone_linger_ms", 2500.into())).unwrap_err();
        assert!(e.to_string().contains("expected in 0..=2000 (channel.linger_ms)"), "{e}");
        let e = parse(&with_key("channel.linger_max_ms", 1500.into())).unwrap_err();
        assert!(e.to_string().contains("expected in 2000..=3600000 (at least channel.linger_ms)"), "{e}");
        // The values of the issue that started the daemon uselessly.
        for v in [0u64, 4_294_967_295] {
            let e = parse(&with_key("channel.buffers", v.into())).unwrap_err();
            assert_eq!(e.key, "machnet_rs.channel.buffers");
        }
    }

    /// Every key of the configuration reference (docs/operations.md, the `machnet_rs` table)
    /// is either range-checked or not a number: a numeric key added without a range fails here.
    #[test]
    fn every_key_of_the_configuration_reference_is_covered() {
        let doc = include_str!("../../docs/operations.md");
        let start = doc.find("### `machnet_rs`").expect("the machnet_rs section");
        let table = &doc[start..];
        let table = &table[table.find("\n| key |").expect("the key table")..];
        let table = &table[..table[1..].find("\n\n").map_or(table.len(), |i| i + 1)];
        let not_numeric = [
            "backend",
            "udp.bind",
            "udp.peers",
            "udp.rss_key",
            "dpdk.device",
            "dpdk.eal_args",
            "dpdk.hugepages",
            "dpdk.promiscuous",
            "dpdk.checksum_offload",
            "dpdk.rss",
            "dpdk.memif_steering",
            "idle",
            "ctrl_sock",
            "metrics_addr",
            "transport.cc",
            "transport.piggyback_acks",
            "access.socket_mode",
            "access.socket_group",
            "access.allow_uids",
            "access.allow_gids",
            "arp.static",
            "no_rx_checksum",
            "fault",
        ];
        let mut seen = 0;
        for line in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = line.split('|').nth(1).unwrap();
            for key in cell.split('`').skip(1).step_by(2) {
                seen += 1;
                let numeric = NUMERIC_KEYS.iter().any(|k| k.key == key);
                assert!(numeric || not_numeric.contains(&key), "{key}: documented but neither range-checked nor known");
            }
        }
        assert!(seen > 40, "only {seen} keys found in the reference");
        // And every range-checked key is documented (the fault table documents its own).
        for k in NUMERIC_KEYS.iter().filter(|k| !k.key.starts_with("fault.")) {
            assert!(table.contains(&format!("`{}`", k.key)), "{}: range-checked but not documented", k.key);
        }
    }

    #[test]
    fn a_bare_metrics_port_means_loopback() {
        assert_eq!(parse_metrics_addr("9101"), Ok("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(parse_metrics_addr("0.0.0.0:9101"), Ok("0.0.0.0:9101".parse().unwrap()));
        assert!(parse_metrics_addr("127.0.0.1").is_err());
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            ("{", "", "invalid configuration"),
            (r#"{"machnet_config": {}}"#, "machnet_config", "no interface"),
            (r#"{"machnet_config": {"zz": {"ip": "1.2.3.4"}}}"#, "machnet_config.zz", "bad MAC"),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3"}}}"#,
                "machnet_config.02:00:00:00:00:01.ip",
                "not an IPv4",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4", "colour": 1}}}"#,
                "",
                "unknown field `colour`",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "extra": 1}"#,
                "",
                "unknown field `extra`",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"backend": "udp"}}"#,
                "machnet_rs.udp",
                "udp backend needs",
            ),
            // The original's config.json alone means its DPDK NIC, found by MAC.
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}}"#,
                "pcie",
                "no PCI network interface has MAC",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4", "cpu_mask": "0xg"}}, "machnet_rs": {"backend": "dpdk"}}"#,
                "cpu_mask",
                "not a hexadecimal",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4", "engine_threads": "1"}}}"#,
                "",
                "invalid type",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"udp": {"bind": "x"}}}"#,
                "machnet_rs.udp.bind",
                "not an IPv4 ip:port",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"udp": {"bind": "127.0.0.1:1"}, "metrics_addr": "localhost"}}"#,
                "machnet_rs.metrics_addr",
                "not an ip:port",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4", "pcie": "net_null0"}}, "machnet_rs": {"backend": "dpdk", "transport": {"window": 300}}}"#,
                "machnet_rs.transport",
                "power of two",
            ),
            (
                r#"{"machnet_config": {"01:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"backend": "dpdk"}}"#,
                "machnet_config.01:00:00:00:00:01",
                "unicast",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"backend": "dpdk"}}"#,
                "machnet_config.02:00:00:00:00:01.pcie",
                "needs a device",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4", "pcie": "a"}}, "machnet_rs": {"backend": "dpdk", "dpdk": {"device": "b"}}}"#,
                "machnet_rs.dpdk.device",
                "give the device once",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"udp": {"bind": "127.0.0.1:1"}, "dpdk": {}}}"#,
                "machnet_rs.dpdk",
                "only meaningful",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"udp": {"bind": "127.0.0.1:1"}, "fault": {"loss": 2}}}"#,
                "machnet_rs.fault.loss",
                "not a probability",
            ),
            (
                r#"{"machnet_config": {"02:00:00:00:00:01": {"ip": "1.2.3.4"}}, "machnet_rs": {"udp": {"bind": "127.0.0.1:1"}, "fault": {"los": 0.1}}}"#,
                "",
                "unknown field `los`",
            ),
        ];
        for (text, key, reason) in cases {
            let e = parse(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/machnet/test.json"), "{msg}");
            assert!(e.key.contains(key), "{text}: key {:?} lacks {key:?}", e.key);
            assert!(msg.contains(reason), "{text}: {msg}");
        }
        let e = Config::load(Path::new("/nonexistent/machnet.json")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
