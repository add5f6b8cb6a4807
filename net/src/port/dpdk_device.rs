//! Devices, per-queue ports and mbuf packet buffers.

use super::eal::{Eal, PoolPtr, OUTSTANDING};
use super::DpdkError;
use crate::port::udp::{rss_queue, RETA_SIZE};
use crate::port::{Burst, Capabilities, PacketBuf, Port, PortStats, RssInfo, BURST};
use crate::rss::Rss;
use crate::wire::{Checksum, ChecksumCaps, EthernetAddress};
use arrayvec::ArrayVec;
use machnet_dpdk_sys as sys;
use std::ffi::{CStr, CString};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RX_IP_MASK: u64 = sys::RTE_MBUF_F_RX_IP_CKSUM_MASK as u64;
const RX_IP_GOOD: u64 = sys::RTE_MBUF_F_RX_IP_CKSUM_GOOD as u64;
const RX_IP_BAD: u64 = sys::RTE_MBUF_F_RX_IP_CKSUM_BAD as u64;
const RX_L4_MASK: u64 = sys::RTE_MBUF_F_RX_L4_CKSUM_MASK as u64;
const RX_L4_GOOD: u64 = sys::RTE_MBUF_F_RX_L4_CKSUM_GOOD as u64;
const RX_L4_BAD: u64 = sys::RTE_MBUF_F_RX_L4_CKSUM_BAD as u64;
const TX_IPV4: u64 = sys::RTE_MBUF_F_TX_IPV4;
const TX_IP_CKSUM: u64 = sys::RTE_MBUF_F_TX_IP_CKSUM;
const TX_UDP_CKSUM: u64 = sys::RTE_MBUF_F_TX_UDP_CKSUM;
const RSS_IPV4: u64 = sys::RTE_ETH_RSS_IPV4 as u64;
const RSS_IPV4_UDP: u64 = sys::RTE_ETH_RSS_NONFRAG_IPV4_UDP as u64;
const RETA_GROUP: usize = sys::RTE_ETH_RETA_GROUP_SIZE as usize;
/// Key length asked for when the device does not report one (the common Toeplitz key size).
const DEFAULT_KEY_LEN: usize = 40;
const ETH_HEADER_LEN: usize = 14;

/// Ports opened by a [`DpdkDevice`] of this process (bit = port id), so that one port cannot be
/// configured twice and then closed under the first owner.
static OPEN_PORTS: AtomicU64 = AtomicU64::new(0);
static POOL_SERIAL: AtomicU32 = AtomicU32::new(0);

/// A device: a virtual device string or a PCI address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A virtual device, `driver<index>[,key=value...]`, e.g. `net_memif0,role=server,...`.
    Vdev(String),
    /// A PCI address, normalised to `dddd:bb:dd.f`.
    Pci(String),
    /// A VMBus device (Hyper-V / Azure's synthetic NIC, bound to `uio_hv_generic`) for DPDK's
    /// netvsc PMD: its instance GUID, lower-case, with optional `,key=value` device arguments
    /// (`latency=`, `rx_copybreak=`, ...).
    Vmbus(String),
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits), lower-cased.
fn normalize_guid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if groups.len() != 5
        || groups.iter().zip(lens).any(|(g, n)| g.len() != n || !g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

fn normalize_pci(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [b, df] => ("0", *b, *df),
        [d, b, df] => (*d, *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let hex = |x: &str, max_len: usize| {
        if x.is_empty() || x.len() > max_len {
            None
        } else {
            u32::from_str_radix(x, 16).ok()
        }
    };
    let (d, b, v, f) = (hex(domain, 4)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
    if v > 0x1f || f > 7 {
        return None;
    }
    Some(format!("{d:04x}:{b:02x}:{v:02x}.{f:x}"))
}

impl DeviceSpec {
    /// A PCI address (`[dddd:]bb:dd.f`), a VMBus GUID (`GUID[,args]`), or else a vdev string.
    pub fn parse(s: &str) -> DeviceSpec {
        let s = s.trim();
        if let Some(addr) = normalize_pci(s) {
            return DeviceSpec::Pci(addr);
        }
        let (head, args) = s.split_once(',').map_or((s, None), |(h, a)| (h, Some(a)));
        match (normalize_guid(head), args) {
            (Some(g), None) => DeviceSpec::Vmbus(g),
            (Some(g), Some(a)) => DeviceSpec::Vmbus(format!("{g},{a}")),
            (None, _) => DeviceSpec::Vdev(s.to_string()),
        }
    }

    /// True for devices on a hardware bus (PCI, VMBus): they want hugepages, and the PCI bus
    /// stays enabled (netvsc finds its accelerated-networking VF there).
    pub fn is_hardware(&self) -> bool {
        matches!(self, DeviceSpec::Pci(_) | DeviceSpec::Vmbus(_))
    }

    /// The ethdev name DPDK gives the port: the vdev string up to its first comma, or the PCI
    /// address.
    pub fn name(&self) -> &str {
        match self {
            DeviceSpec::Vdev(s) | DeviceSpec::Vmbus(s) => s.split(',').next().unwrap_or(s),
            DeviceSpec::Pci(a) => a,
        }
    }

    /// The EAL arguments that probe this device: `--vdev <string>`, or `-a <address>` for a
    /// PCI address or VMBus GUID (EAL's VMBus bus takes the GUID, with the netvsc arguments
    /// after it, in its allow list).
    pub fn eal_args(&self) -> [String; 2] {
        match self {
            DeviceSpec::Vdev(s) => ["--vdev".to_string(), s.clone()],
            DeviceSpec::Pci(a) | DeviceSpec::Vmbus(a) => ["-a".to_string(), a.clone()],
        }
    }

    fn devargs(&self) -> &str {
        match self {
            DeviceSpec::Vdev(s) | DeviceSpec::Pci(s) | DeviceSpec::Vmbus(s) => s,
        }
    }
}

/// How a device is set up.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Receive/transmit queue pairs (one per shard).
    pub queues: u16,
    /// IP MTU.
    pub mtu: u16,
    /// Mbufs in each queue's mempool (a power of two minus one is optimal).
    pub mbufs_per_queue: u32,
    /// Per-lcore mempool cache (used by EAL lcores and registered threads).
    pub mbuf_cache: u32,
    /// Bytes per mbuf including DPDK's 128-byte headroom (default 2176: 2048 of frame).
    pub mbuf_data_room: u16,
    /// Receive descriptors per queue (adjusted to the device's limits).
    pub rx_descriptors: u16,
    /// Transmit descriptors per queue (adjusted to the device's limits).
    pub tx_descriptors: u16,
    /// Receive frames for every MAC address.
    pub promiscuous: bool,
    /// The MAC address the port should have (Machnet's configuration names the port by it).
    /// If the device has another, it is set with `rte_eth_dev_default_mac_addr_set`; when the
    /// device refuses, promiscuous mode is turned on instead so that frames for this address
    /// still arrive, and [`Capabilities::mac`](super::Capabilities) reports this address.
    pub mac: Option<EthernetAddress>,
    /// Use the device's IPv4/UDP checksum offloads when it has them.
    pub checksum_offload: bool,
    /// Spread received IPv4/UDP flows over the queues with RSS when the device has it.
    pub rss: bool,
    /// Wait this long for the link to come up; `None` returns at once (see
    /// [`DpdkDevice::wait_link`]).
    pub link_timeout: Option<Duration>,
    /// Steer transmitted frames to the peer's queue its RSS would pick, on a device that
    /// carries the sender's queue index to the peer (memif only; see [`PeerSteering`]).
    pub peer_steering: Option<PeerSteering>,
}

/// Most queues a peer may have under [`PeerSteering`].
pub const MAX_PEER_QUEUES: u16 = 64;

/// RSS done by the sender, for a device that has no hash of its own but carries each frame
/// from the sender's transmit queue `i` to the receiver's receive queue `i` (DPDK's memif).
///
/// With `queues` = L shards here and `peer_queues` = P there, the device gets L x P queue
/// pairs. Shard `s` transmits a frame on queue `s * P + r`, where `r` is the queue the peer's
/// NIC would pick (the Toeplitz hash of the IPv4/UDP 4-tuple under `peer_key`, through a
/// round-robin table of [`RETA_SIZE`] entries over P queues; queue 0 for ARP and other
/// non-IPv4 frames, as a NIC gives them), and polls queues `t * L + s` for every peer shard
/// `t`. The peer does the same with L and P swapped, so each side receives exactly what an RSS
/// NIC with its key would give each of its queues, and [`Capabilities::rss`] reports `key`
/// with the round-robin table over L queues for steering client flows (RSS--). Both sides must
/// be configured with each other's queues and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSteering {
    /// The key the peer hashes this side's frames with (this side's "NIC key").
    pub key: Vec<u8>,
    /// The peer's queues (its shards), 1..=[`MAX_PEER_QUEUES`].
    pub peer_queues: u16,
    /// The peer's key.
    pub peer_key: Vec<u8>,
}

/// A port's queues under [`PeerSteering`].
struct Steered {
    /// Receive queues, one per peer shard.
    rx: ArrayVec<u16, { MAX_PEER_QUEUES as usize }>,
    /// Transmit queues, one per peer queue (index = the peer's queue).
    tx: ArrayVec<u16, { MAX_PEER_QUEUES as usize }>,
    /// The peer's RSS (`None` for one peer queue).
    peer: Option<Rss>,
    /// The receive queue polled first next time (fairness when bursts fill up).
    next_rx: usize,
}

impl Default for DeviceConfig {
    /// One queue pair, MTU 1500, 8191 mbufs per queue (cache 256, 2048-byte frames), 1024
    /// descriptors each way, no promiscuous mode, offloads and RSS when available, 10 s link
    /// wait.
    fn default() -> Self {
        DeviceConfig {
            queues: 1,
            mtu: 1500,
            mbufs_per_queue: 8191,
            mbuf_cache: 256,
            mbuf_data_room: sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
            rx_descriptors: 1024,
            tx_descriptors: 1024,
            promiscuous: false,
            mac: None,
            checksum_offload: true,
            rss: true,
            link_timeout: Some(Duration::from_secs(10)),
            peer_steering: None,
        }
    }
}

/// The link as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    /// Link up.
    pub up: bool,
    /// Speed in Mbit/s (0 if unknown).
    pub speed_mbps: u32,
}

/// Device-wide counters (`rte_eth_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EthStats {
    /// Frames received.
    pub ipackets: u64,
    /// Frames transmitted.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes transmitted.
    pub obytes: u64,
    /// Frames dropped by the device (receive queue full).
    pub imissed: u64,
    /// Receive errors.
    pub ierrors: u64,
    /// Transmit errors.
    pub oerrors: u64,
    /// Receive mbuf allocation failures.
    pub rx_nombuf: u64,
}

/// Counters of a [`DpdkPort`] beyond [`PortStats`]; every frame counted here is also in
/// `PortStats::rx_dropped`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DpdkPortStats {
    /// Frames the device flagged with a bad IPv4 or L4 checksum.
    pub rx_bad_checksum: u64,
    /// Frames that were not a single exclusively owned segment (chained or shared mbufs).
    pub rx_unusable: u64,
}

/// Which transmit checksums the device computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TxOffload {
    ipv4: bool,
    udp: bool,
}

/// State shared by a device and its ports; the last owner stops and closes the device.
struct DeviceShared {
    eal: Eal,
    port_id: u16,
    /// The generic device behind the port, removed (detached) at teardown, which also closes
    /// the port, so that `open` can probe it again.
    device: *mut sys::rte_device,
    pools: Vec<PoolPtr>,
    started: AtomicBool,
    closed: AtomicBool,
}

// SAFETY: the raw mempool and device pointers are process-wide shared objects whose operations
// are thread-safe (the default multi-producer/multi-consumer ring); the device is configured,
// started, stopped and closed only by whoever holds the last reference (or `&mut DpdkDevice`
// with no port alive), never concurrently with its queues' use.
unsafe impl Send for DeviceShared {}
// SAFETY: as above; shared references only read `port_id` and the atomics.
unsafe impl Sync for DeviceShared {}

impl DeviceShared {
    fn stop(&self) -> Result<(), DpdkError> {
        if self.started.swap(false, Ordering::SeqCst) {
            // SAFETY: no queue of the port is being polled: callers hold the last reference
            // (every DpdkPort is gone) or checked that no port is alive.
            let rc = unsafe { sys::rte_eth_dev_stop(self.port_id) };
            if rc < 0 {
                return Err(DpdkError::Call { op: "rte_eth_dev_stop", errno: -rc });
            }
        }
        Ok(())
    }

    /// Stops and closes the port and hands the mempools to the EAL (freed at its shutdown).
    fn teardown(&mut self) -> Result<(), DpdkError> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let stopped = self.stop();
        // Removing (detaching) the device makes its driver close the port, once, and lets
        // `open` probe it again later; closing first and then removing makes some drivers
        // (memif) free memory twice.
        if !self.device.is_null() {
            // SAFETY: `device` is the probed device behind this stopped port, which nothing
            // polls (last reference).
            let rc = unsafe { sys::rte_dev_remove(self.device) };
            if rc < 0 {
                log::warn!("DPDK port {}: cannot detach the device (errno {})", self.port_id, -rc);
            }
        }
        // SAFETY: a plain validity query.
        let rc = if unsafe { sys::rte_eth_dev_is_valid_port(self.port_id) } != 0 {
            // The driver did not release the port on removal (or there was no device): close it.
            // SAFETY: the port is stopped and nothing polls it.
            unsafe { sys::rte_eth_dev_close(self.port_id) }
        } else {
            0
        };
        for p in self.pools.drain(..) {
            self.eal.defer_pool_free(p);
        }
        OPEN_PORTS.fetch_and(!1u64.checked_shl(u32::from(self.port_id)).unwrap_or(0), Ordering::SeqCst);
        stopped?;
        if rc < 0 {
            return Err(DpdkError::Call { op: "rte_eth_dev_close", errno: -rc });
        }
        Ok(())
    }
}

impl Drop for DeviceShared {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            log::warn!("DPDK port {}: {e}", self.port_id);
        }
    }
}

/// An open, started DPDK device. Take its per-queue ports with [`take_ports`](Self::take_ports).
pub struct DpdkDevice {
    shared: Arc<DeviceShared>,
    caps: Capabilities,
    ports: Vec<DpdkPort>,
    name: String,
    driver: String,
}

impl std::fmt::Debug for DpdkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkDevice")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("port_id", &self.shared.port_id)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

fn errno() -> i32 {
    // SAFETY: reads this thread's `rte_errno`.
    unsafe { sys::machnet_errno() }
}

fn check(op: &'static str, rc: i32) -> Result<(), DpdkError> {
    if rc < 0 {
        Err(DpdkError::Call { op, errno: -rc })
    } else {
        Ok(())
    }
}

fn find_port(name: &CStr) -> Option<u16> {
    let mut id = 0u16;
    // SAFETY: `name` is NUL-terminated; `id` is a valid out-pointer.
    let rc = unsafe { sys::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut id) };
    (rc == 0).then_some(id)
}

fn link_status(port_id: u16) -> Result<LinkStatus, DpdkError> {
    let mut link = sys::rte_eth_link::default();
    // SAFETY: `link` is a valid out-pointer; the port id is a configured port.
    check("rte_eth_link_get_nowait", unsafe { sys::rte_eth_link_get_nowait(port_id, &mut link) })?;
    Ok(LinkStatus { up: link.link_status() == sys::RTE_ETH_LINK_UP as u16, speed_mbps: link.link_speed })
}

impl DpdkDevice {
    /// Opens and starts a device: finds the port the EAL probed for `spec` (or hot-plugs it),
    /// configures `cfg.queues` queue pairs with a mempool each, the MTU, checksum offloads and
    /// RSS where the device has them (reading the RSS key and RETA back), starts it, and waits
    /// for the link if `cfg.link_timeout` says so. On error everything set up so far is undone.
    pub fn open(eal: &Eal, spec: &DeviceSpec, cfg: &DeviceConfig) -> Result<DpdkDevice, DpdkError> {
        if !Eal::is_live() {
            return Err(DpdkError::EalNotInitialised);
        }
        if cfg.queues == 0 {
            return Err(DpdkError::BadConfig("at least one queue pair is needed"));
        }
        let name = CString::new(spec.name()).map_err(|_| DpdkError::NulInArgument)?;
        let port_id = match find_port(&name) {
            Some(id) => id,
            None => {
                // Not given to the EAL: hot-plug it.
                let devargs = CString::new(spec.devargs()).map_err(|_| DpdkError::NulInArgument)?;
                // SAFETY: `devargs` is a NUL-terminated string; the EAL is initialised.
                let rc = unsafe { sys::rte_dev_probe(devargs.as_ptr()) };
                match find_port(&name) {
                    Some(id) => id,
                    None => return Err(DpdkError::DeviceNotFound { errno: if rc < 0 { -rc } else { 0 } }),
                }
            }
        };
        let bit = 1u64.checked_shl(u32::from(port_id)).unwrap_or(0);
        if OPEN_PORTS.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return Err(DpdkError::BadConfig("the device is already open in this process"));
        }
        // From here on, dropping `shared` closes the port.
        let mut shared = DeviceShared {
            eal: eal.clone(),
            port_id,
            device: core::ptr::null_mut(),
            pools: Vec::new(),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };

        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: `info` is a valid out-pointer for the port's information.
        check("rte_eth_dev_info_get", unsafe { sys::rte_eth_dev_info_get(port_id, &mut info) })?;
        shared.device = info.device;
        let driver = if info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: the driver name is a static NUL-terminated string of the driver.
            unsafe { CStr::from_ptr(info.driver_name) }.to_string_lossy().into_owned()
        };

        let steer = cfg.peer_steering.as_ref();
        if let Some(st) = steer {
            if driver != "net_memif" {
                return Err(DpdkError::BadConfig(
                    "peer steering needs a device that carries the sender's queue index to the peer (net_memif)",
                ));
            }
            if !(1..=MAX_PEER_QUEUES).contains(&st.peer_queues) {
                return Err(DpdkError::BadConfig("peer steering: the peer's queues must be in 1..=64"));
            }
            if Rss::new(&st.key, &[0]).is_err() || Rss::new(&st.peer_key, &[0]).is_err() {
                return Err(DpdkError::BadConfig("peer steering: an RSS key must have 16 to 64 bytes"));
            }
        }
        // Queue pairs of the device: one per shard, or one per (shard, peer queue) when steered.
        let pairs = match steer {
            Some(st) => u32::from(cfg.queues) * u32::from(st.peer_queues),
            None => u32::from(cfg.queues),
        };
        let max_queues = info.max_rx_queues.min(info.max_tx_queues);
        if pairs > u32::from(max_queues) {
            return Err(DpdkError::Unsupported { what: "queue pairs", requested: pairs, limit: u32::from(max_queues) });
        }
        let pairs = pairs as u16;
        if cfg.mtu > info.max_mtu || cfg.mtu < info.min_mtu {
            let limit = if cfg.mtu > info.max_mtu { info.max_mtu } else { info.min_mtu };
            return Err(DpdkError::Unsupported {
                what: "bytes of MTU",
                requested: u32::from(cfg.mtu),
                limit: u32::from(limit),
            });
        }
        let frame_room = usize::from(cfg.mbuf_data_room).saturating_sub(sys::RTE_PKTMBUF_HEADROOM as usize);
        if usize::from(cfg.mtu) + ETH_HEADER_LEN > frame_room {
            return Err(DpdkError::BadConfig("the MTU plus the Ethernet header exceeds the mbuf data room"));
        }
        let min_mbufs = u32::from(cfg.rx_descriptors) + u32::from(cfg.tx_descriptors) + 2 * BURST as u32;
        if cfg.mbufs_per_queue < min_mbufs {
            return Err(DpdkError::BadConfig("too few mbufs per queue for the descriptors (need rx + tx + 64)"));
        }

        // Offloads: each one only if the device has it.
        let want = |capa: u64, bit: u32| cfg.checksum_offload && capa & u64::from(bit) != 0;
        let rx_ip = want(info.rx_offload_capa, sys::RTE_ETH_RX_OFFLOAD_IPV4_CKSUM);
        let rx_udp = want(info.rx_offload_capa, sys::RTE_ETH_RX_OFFLOAD_UDP_CKSUM);
        let tx = TxOffload {
            ipv4: want(info.tx_offload_capa, sys::RTE_ETH_TX_OFFLOAD_IPV4_CKSUM),
            udp: want(info.tx_offload_capa, sys::RTE_ETH_TX_OFFLOAD_UDP_CKSUM),
        };
        let mut conf = sys::rte_eth_conf::default();
        conf.rxmode.mtu = u32::from(cfg.mtu);
        if rx_ip {
            conf.rxmode.offloads |= u64::from(sys::RTE_ETH_RX_OFFLOAD_IPV4_CKSUM);
        }
        if rx_udp {
            conf.rxmode.offloads |= u64::from(sys::RTE_ETH_RX_OFFLOAD_UDP_CKSUM);
        }
        if tx.ipv4 {
            conf.txmode.offloads |= u64::from(sys::RTE_ETH_TX_OFFLOAD_IPV4_CKSUM);
        }
        if tx.udp {
            conf.txmode.offloads |= u64::from(sys::RTE_ETH_TX_OFFLOAD_UDP_CKSUM);
        }
        // RSS over IPv4/UDP 4-tuples, only with several queues and a device that hashes them.
        let rss_on = cfg.queues > 1 && cfg.rss && steer.is_none() && info.flow_type_rss_offloads & RSS_IPV4_UDP != 0;
        if rss_on {
            conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_key = core::ptr::null_mut(); // the device's key
            conf.rx_adv_conf.rss_conf.rss_hf = (RSS_IPV4 | RSS_IPV4_UDP) & info.flow_type_rss_offloads;
        }
        // SAFETY: `conf` is a valid configuration that lives across the call; the port is not
        // started.
        check("rte_eth_dev_configure", unsafe { sys::rte_eth_dev_configure(port_id, pairs, pairs, &conf) })?;

        let (mut rxd, mut txd) = (cfg.rx_descriptors, cfg.tx_descriptors);
        // SAFETY: valid out-pointers; the port is configured.
        check("rte_eth_dev_adjust_nb_rx_tx_desc", unsafe {
            sys::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut rxd, &mut txd)
        })?;
        // SAFETY: plain query of a valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) }.max(-1);
        let cache = cfg.mbuf_cache.min(512).min(cfg.mbufs_per_queue * 2 / 3);
        let serial = POOL_SERIAL.fetch_add(1, Ordering::Relaxed);
        // One mempool per shard (its port allocates from it and its receive queues fill from it).
        for q in 0..cfg.queues {
            let pool_name = CString::new(format!("mn{port_id}q{q}s{serial}")).expect("no NUL");
            // SAFETY: the name is NUL-terminated; sizes were validated above.
            let pool = unsafe {
                sys::rte_pktmbuf_pool_create(
                    pool_name.as_ptr(),
                    cfg.mbufs_per_queue,
                    cache,
                    0,
                    cfg.mbuf_data_room,
                    socket,
                )
            };
            if pool.is_null() {
                return Err(DpdkError::Mempool { queue: q, errno: errno() });
            }
            shared.pools.push(PoolPtr(pool));
        }
        for q in 0..pairs {
            // Receive queue q belongs to shard q % L (steered: peer shard q / L's ring to it).
            let pool = shared.pools[usize::from(q % cfg.queues)].0;
            // SAFETY: the port is configured and stopped; a null queue configuration selects
            // the device defaults with the port's offloads; `pool` is a valid mbuf pool.
            check("rte_eth_rx_queue_setup", unsafe {
                sys::rte_eth_rx_queue_setup(port_id, q, rxd, socket as u32, core::ptr::null(), pool)
            })?;
            // SAFETY: as above.
            check("rte_eth_tx_queue_setup", unsafe {
                sys::rte_eth_tx_queue_setup(port_id, q, txd, socket as u32, core::ptr::null())
            })?;
        }

        // SAFETY: the port is configured with all its queues.
        check("rte_eth_dev_start", unsafe { sys::rte_eth_dev_start(port_id) })?;
        shared.started.store(true, Ordering::SeqCst);
        if cfg.promiscuous {
            // SAFETY: a started port.
            let rc = unsafe { sys::rte_eth_promiscuous_enable(port_id) };
            if rc < 0 {
                log::warn!("DPDK port {port_id} ({driver}): promiscuous mode unavailable (errno {})", -rc);
            }
        }

        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid out-pointer.
        check("rte_eth_macaddr_get", unsafe { sys::rte_eth_macaddr_get(port_id, &mut mac) })?;
        if let Some(want) = cfg.mac.filter(|m| m.0 != mac.addr_bytes) {
            let mut addr = sys::rte_ether_addr { addr_bytes: want.0 };
            // SAFETY: a started port and a valid address.
            let rc = unsafe { sys::rte_eth_dev_default_mac_addr_set(port_id, &mut addr) };
            if rc < 0 {
                log::warn!(
                    "DPDK port {port_id} ({driver}): cannot change its MAC {} to {want} (errno {}); \
                     receiving in promiscuous mode instead",
                    EthernetAddress(mac.addr_bytes),
                    -rc
                );
                if !cfg.promiscuous {
                    // SAFETY: a started port.
                    let rc = unsafe { sys::rte_eth_promiscuous_enable(port_id) };
                    if rc < 0 {
                        log::warn!("DPDK port {port_id} ({driver}): promiscuous mode unavailable (errno {})", -rc);
                    }
                }
            }
            mac.addr_bytes = want.0;
        }
        let mut mtu = cfg.mtu;
        // SAFETY: valid out-pointer.
        check("rte_eth_dev_get_mtu", unsafe { sys::rte_eth_dev_get_mtu(port_id, &mut mtu) })?;
        let rss = match steer {
            // What the peer hashes with: this side's key over a round-robin table of its shards.
            Some(st) if cfg.queues > 1 => {
                Some(RssInfo { key: st.key.clone(), reta: Rss::round_robin_reta(RETA_SIZE, cfg.queues) })
            }
            Some(_) => None,
            None if rss_on => read_back_rss(port_id, &info, cfg.queues, &driver),
            None => None,
        };
        let checksum = ChecksumCaps {
            // Software always verifies on receive unless the device flags the frame GOOD
            // (`rx_checksum_good`); transmit checksums go to the device when it offloads them.
            ipv4: if tx.ipv4 { Checksum::Rx } else { Checksum::Both },
            udp: if tx.udp { Checksum::Rx } else { Checksum::Both },
            icmp: Checksum::Both,
        };
        let caps = Capabilities {
            mac: EthernetAddress(mac.addr_bytes),
            mtu: usize::from(mtu),
            queues: cfg.queues,
            rss,
            checksum,
        };

        let shared = Arc::new(shared);
        let peer_rss = steer.filter(|st| st.peer_queues > 1).map(|st| {
            Rss::new(&st.peer_key, &Rss::round_robin_reta(RETA_SIZE, st.peer_queues)).expect("key checked above")
        });
        let (l, p) = (cfg.queues, steer.map_or(1, |st| st.peer_queues));
        let ports = (0..cfg.queues)
            .map(|q| DpdkPort {
                _device: Arc::clone(&shared),
                port_id,
                queue: q,
                steered: steer.map(|_| {
                    Box::new(Steered {
                        rx: (0..p).map(|t| t * l + q).collect(),
                        tx: (0..p).map(|r| q * p + r).collect(),
                        peer: peer_rss.clone(),
                        next_rx: 0,
                    })
                }),
                pool: shared.pools[usize::from(q)].0,
                caps: caps.clone(),
                tx,
                stats: PortStats::default(),
                dstats: DpdkPortStats::default(),
                handed: 0,
                returned: 0,
            })
            .collect();
        let dev = DpdkDevice { shared, caps, ports, name: spec.name().to_string(), driver };
        if let Some(t) = cfg.link_timeout {
            dev.wait_link(t)?;
        }
        Ok(dev)
    }

    /// The DPDK port id.
    pub fn port_id(&self) -> u16 {
        self.shared.port_id
    }

    /// The ethdev name (`net_memif0`, `0000:00:04.0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name (`net_memif`, ...).
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// MAC, MTU, queues, RSS key and RETA as read back from the device, checksum handling.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The per-queue ports, in queue order; empty after the first call.
    pub fn take_ports(&mut self) -> Vec<DpdkPort> {
        core::mem::take(&mut self.ports)
    }

    /// The link status now.
    pub fn link(&self) -> Result<LinkStatus, DpdkError> {
        link_status(self.shared.port_id)
    }

    /// Waits up to `timeout` for the link to come up (polling every 10 ms).
    pub fn wait_link(&self, timeout: Duration) -> Result<LinkStatus, DpdkError> {
        let start = Instant::now();
        loop {
            let l = self.link()?;
            if l.up {
                return Ok(l);
            }
            if start.elapsed() >= timeout {
                return Err(DpdkError::LinkDown { waited_ms: start.elapsed().as_millis() as u64 });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Device-wide counters.
    pub fn eth_stats(&self) -> Result<EthStats, DpdkError> {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid out-pointer.
        check("rte_eth_stats_get", unsafe { sys::rte_eth_stats_get(self.shared.port_id, &mut s) })?;
        Ok(EthStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }

    fn ports_alive(&mut self) -> usize {
        // Ports never taken are dropped here: nobody can poll them any more.
        self.ports.clear();
        Arc::strong_count(&self.shared) - 1
    }

    /// Stops the device (`rte_eth_dev_stop`). Every [`DpdkPort`] must have been dropped first
    /// (stop polling), otherwise [`DpdkError::PortsInUse`]. With memif, the peer must have
    /// stopped polling too (see the module documentation).
    pub fn stop(&mut self) -> Result<(), DpdkError> {
        match self.ports_alive() {
            0 => self.shared.stop(),
            alive => Err(DpdkError::PortsInUse { alive }),
        }
    }

    /// Stops (if needed) and closes the device and releases its port. If ports are still alive
    /// this returns [`DpdkError::PortsInUse`] and the device closes when the last one is
    /// dropped.
    pub fn close(mut self) -> Result<(), DpdkError> {
        let alive = self.ports_alive();
        match Arc::get_mut(&mut self.shared) {
            Some(shared) if alive == 0 => shared.teardown(),
            _ => Err(DpdkError::PortsInUse { alive }),
        }
    }
}

/// Programs the RETA round-robin over the queues (if the device lets us), then reads the key
/// and RETA back. Anything missing degrades to `None` (software steering), never an error.
fn read_back_rss(port_id: u16, info: &sys::rte_eth_dev_info, queues: u16, driver: &str) -> Option<RssInfo> {
    let size = usize::from(info.reta_size);
    if size == 0 {
        log::warn!("DPDK port {port_id} ({driver}): RSS without a readable RETA; steering in software");
        return None;
    }
    let groups = size.div_ceil(RETA_GROUP);
    let mut conf = vec![sys::rte_eth_rss_reta_entry64::default(); groups];
    for i in 0..size {
        conf[i / RETA_GROUP].mask |= 1u64 << (i % RETA_GROUP);
        conf[i / RETA_GROUP].reta[i % RETA_GROUP] = (i % usize::from(queues)) as u16;
    }
    // SAFETY: `conf` holds `groups` entries covering `size` RETA entries.
    let rc = unsafe { sys::rte_eth_dev_rss_reta_update(port_id, conf.as_mut_ptr(), info.reta_size) };
    if rc < 0 {
        log::warn!("DPDK port {port_id} ({driver}): cannot program the RETA (errno {}); using the device's", -rc);
    }
    for c in conf.iter_mut() {
        c.reta = [0; RETA_GROUP];
    }
    // SAFETY: as above; the masks select every entry to read.
    let rc = unsafe { sys::rte_eth_dev_rss_reta_query(port_id, conf.as_mut_ptr(), info.reta_size) };
    if rc < 0 {
        log::warn!("DPDK port {port_id} ({driver}): cannot read the RETA back (errno {}); steering in software", -rc);
        return None;
    }
    let reta: Vec<u16> = (0..size).map(|i| conf[i / RETA_GROUP].reta[i % RETA_GROUP]).collect();

    let key_len = if info.hash_key_size > 0 { usize::from(info.hash_key_size) } else { DEFAULT_KEY_LEN };
    let mut key = vec![0u8; key_len];
    let mut rss_conf = sys::rte_eth_rss_conf { rss_key: key.as_mut_ptr(), rss_key_len: key_len as u8, rss_hf: 0 };
    // SAFETY: `rss_key` points at `key_len` writable bytes that outlive the call.
    let rc = unsafe { sys::rte_eth_dev_rss_hash_conf_get(port_id, &mut rss_conf) };
    if rc < 0 {
        log::warn!(
            "DPDK port {port_id} ({driver}): cannot read the RSS key back (errno {}); steering in software",
            -rc
        );
        return None;
    }
    if rss_conf.rss_hf & RSS_IPV4_UDP == 0 {
        log::warn!("DPDK port {port_id} ({driver}): RSS does not hash IPv4/UDP ports; steering in software");
        return None;
    }
    key.truncate(usize::from(rss_conf.rss_key_len).clamp(1, key_len));
    Some(RssInfo { key, reta })
}

/// Transmit offload flags and header lengths for a frame: IPv4 (no VLAN) gets the IP checksum
/// and, for unfragmented UDP, the UDP checksum computed by the device, as far as it offloads
/// them. Other frames get none.
#[inline]
fn tx_offload(frame: &[u8], off: TxOffload) -> (u64, u8, u16) {
    // A device without transmit offloads (memif, af_packet) needs no look at the frame.
    if !off.ipv4 && !off.udp {
        return (0, 0, 0);
    }
    if frame.len() < ETH_HEADER_LEN + 20 || frame[12] != 0x08 || frame[13] != 0x00 || frame[14] >> 4 != 4 {
        return (0, 0, 0);
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if ihl < 20 || frame.len() < ETH_HEADER_LEN + ihl {
        return (0, 0, 0);
    }
    let mut flags = 0;
    if off.ipv4 {
        flags |= TX_IPV4 | TX_IP_CKSUM;
    }
    let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
    if off.udp && frame[23] == 17 && !fragment && frame.len() >= ETH_HEADER_LEN + ihl + 8 {
        flags |= TX_IPV4 | TX_UDP_CKSUM;
    }
    if flags == 0 {
        return (0, 0, 0);
    }
    (flags, ETH_HEADER_LEN as u8, ihl as u16)
}

/// One receive/transmit queue pair of a [`DpdkDevice`], for one shard. Move it to the thread
/// that polls it; drop it to stop polling (before the device is stopped).
///
/// Frames to transmit must be emitted with [`capabilities().checksum`](Capabilities): when the
/// device offloads the UDP checksum, the checksum field must hold the pseudo-header sum (as
/// `FrameRepr::emit` writes it), and the port sets the offload flags and header lengths on
/// every IPv4 frame.
pub struct DpdkPort {
    /// Keeps the device open (and started) while the port lives.
    _device: Arc<DeviceShared>,
    port_id: u16,
    queue: u16,
    /// The queues of this shard under [`PeerSteering`]; `None`: the queue pair `queue`.
    steered: Option<Box<Steered>>,
    pool: *mut sys::rte_mempool,
    caps: Capabilities,
    tx: TxOffload,
    stats: PortStats,
    dstats: DpdkPortStats,
    /// Buffers handed out (alloc, rx) and returned (free, tx): their difference is added to
    /// `OUTSTANDING` when the port is dropped.
    handed: u64,
    returned: u64,
}

// SAFETY: the port owns its queue pair exclusively (one `DpdkPort` per queue, not `Clone`,
// not `Sync`), DPDK queues may be used from any thread as long as it is one at a time, and the
// mempool is thread-safe.
unsafe impl Send for DpdkPort {}

impl std::fmt::Debug for DpdkPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkPort").field("port_id", &self.port_id).field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl DpdkPort {
    /// The DPDK port id.
    pub fn port_id(&self) -> u16 {
        self.port_id
    }
    /// The queue pair index.
    pub fn queue(&self) -> u16 {
        self.queue
    }
    /// Counters specific to this backend.
    pub fn dpdk_stats(&self) -> DpdkPortStats {
        self.dstats
    }

    #[inline]
    fn drop_rx(&mut self, m: *mut sys::rte_mbuf) {
        // SAFETY: `m` came from rx_burst and is owned by us; it is not used afterwards.
        unsafe { sys::machnet_pktmbuf_free(m) };
        self.stats.rx_dropped += 1;
    }
}

impl Drop for DpdkPort {
    fn drop(&mut self) {
        // `_device` drops after this: the last reference stops and closes the device.
        OUTSTANDING.fetch_add(self.handed.wrapping_sub(self.returned) as i64, Ordering::AcqRel);
    }
}

impl Port for DpdkPort {
    type Buf = DpdkBuf;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    #[inline]
    fn alloc(&mut self) -> Option<DpdkBuf> {
        let mut v = MaybeUninit::<sys::machnet_mbuf_view>::uninit();
        // SAFETY: `pool` is this queue's live mempool; on success the shim fills `v`.
        let m = unsafe { sys::machnet_mbuf_alloc_view(self.pool, v.as_mut_ptr()) };
        let Some(m) = NonNull::new(m) else {
            self.stats.alloc_failures += 1;
            return None;
        };
        // SAFETY: the allocation succeeded, so the shim initialised the view.
        let v = unsafe { v.assume_init() };
        self.handed += 1;
        let data = NonNull::new(v.data).unwrap_or(NonNull::dangling());
        let room = if v.data.is_null() { 0 } else { v.room };
        Some(DpdkBuf { m, data, len: 0, room, rx_good: false })
    }

    #[inline]
    fn free(&mut self, buf: DpdkBuf) {
        self.returned += 1;
        let m = buf.into_raw();
        // SAFETY: `m` is an mbuf we own exclusively; it is not used afterwards.
        unsafe { sys::machnet_pktmbuf_free(m.as_ptr()) };
    }

    fn rx_burst(&mut self, out: &mut Burst<DpdkBuf>) -> usize {
        let Some(st) = self.steered.as_mut() else {
            return self.rx_queue(self.queue, out);
        };
        // Every peer shard's ring to this shard, starting where the last call stopped.
        let (n, first) = (st.rx.len(), st.next_rx);
        st.next_rx = (first + 1) % n;
        let mut got = 0;
        for i in 0..n {
            if out.is_full() {
                break;
            }
            let Some(q) = self.steered.as_ref().map(|st| st.rx[(first + i) % n]) else { break };
            got += self.rx_queue(q, out);
        }
        got
    }

    fn tx_burst(&mut self, pkts: &mut Burst<DpdkBuf>) -> usize {
        let n = pkts.len();
        if n == 0 {
            return 0;
        }
        // Only the first `n` pointers are written and read: not zeroing all 32 on every call
        // (a one-frame burst at window 1 is the common case).
        let mut raw = [MaybeUninit::<*mut sys::rte_mbuf>::uninit(); BURST];
        for (slot, b) in raw.iter_mut().zip(pkts.iter()) {
            let (flags, l2, l3) = tx_offload(b.frame(), self.tx);
            // SAFETY: `b` owns its single-segment mbuf exclusively; `len <= room` fits u16
            // because an mbuf's buffer length is a u16.
            unsafe { sys::machnet_mbuf_prepare_tx(b.m.as_ptr(), b.len as u16, flags, l2, l3) };
            slot.write(b.m.as_ptr());
        }
        // SAFETY: the loop above wrote the first `n` elements (`pkts` holds `n <= BURST`
        // buffers), and `MaybeUninit<T>` has `T`'s layout.
        let mbufs: &mut [*mut sys::rte_mbuf] = unsafe { core::slice::from_raw_parts_mut(raw.as_mut_ptr().cast(), n) };
        let Some(st) = self.steered.as_ref() else {
            let sent = self.tx_queue(self.queue, mbufs);
            for b in pkts.drain(..sent) {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += u64::from(b.len);
                // The device owns it now.
                let _ = b.into_raw();
            }
            self.stats.tx_busy += (n - sent) as u64;
            return sent;
        };
        // Each frame to the transmit queue that meets the peer's queue its RSS would pick, in
        // order within each queue (a flow always hashes to one queue, so its frames keep
        // their order; frames a full queue refused stay, in order, for the caller's retry).
        let mut target = [st.tx[0]; BURST];
        if let Some(rss) = &st.peer {
            for (t, b) in target.iter_mut().zip(pkts.iter()) {
                *t = st.tx[usize::from(rss_queue(rss, b.frame())).min(st.tx.len() - 1)];
            }
        }
        let mut sent_mask = [false; BURST];
        let mut done = [false; BURST];
        let mut sent = 0;
        for i in 0..n {
            if done[i] {
                continue;
            }
            let mut group = [core::ptr::null_mut::<sys::rte_mbuf>(); BURST];
            let mut index = [0usize; BURST];
            let mut k = 0;
            for j in i..n {
                if !done[j] && target[j] == target[i] {
                    done[j] = true;
                    group[k] = mbufs[j];
                    index[k] = j;
                    k += 1;
                }
            }
            let ok = self.tx_queue(target[i], &mut group[..k]);
            for &j in &index[..ok] {
                sent_mask[j] = true;
            }
            sent += ok;
        }
        let all = core::mem::take(pkts);
        for (j, b) in all.into_iter().enumerate() {
            if sent_mask[j] {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += u64::from(b.len);
                // The device owns it now.
                let _ = b.into_raw();
            } else {
                pkts.push(b);
            }
        }
        self.stats.tx_busy += (n - sent) as u64;
        sent
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

impl DpdkPort {
    /// Transmits `mbufs` (prepared) on queue `q`; the device owns the first `sent` returned.
    #[inline]
    fn tx_queue(&mut self, q: u16, mbufs: &mut [*mut sys::rte_mbuf]) -> usize {
        // SAFETY: the port is started, queue `q` is this port's alone, `mbufs` are valid
        // mbufs owned by the caller; the device takes ownership of the first `sent`.
        let sent =
            usize::from(unsafe { sys::machnet_eth_tx_burst(self.port_id, q, mbufs.as_mut_ptr(), mbufs.len() as u16) });
        self.returned += sent as u64;
        sent
    }

    /// Receives from queue `q` into `out`'s remaining room.
    fn rx_queue(&mut self, q: u16, out: &mut Burst<DpdkBuf>) -> usize {
        let want = out.remaining_capacity().min(BURST);
        if want == 0 {
            return 0;
        }
        // Not zeroed: the device writes the first `n` (this runs on every poll, empty or not).
        let mut raw = [MaybeUninit::<*mut sys::rte_mbuf>::uninit(); BURST];
        // SAFETY: the port is started (it cannot be stopped while this DpdkPort lives), queue
        // `q` is ours alone, and `raw` has room for `want <= BURST` pointers (`MaybeUninit<T>`
        // has `T`'s layout).
        let n = unsafe { sys::machnet_eth_rx_burst(self.port_id, q, raw.as_mut_ptr().cast(), want as u16) };
        // SAFETY: rx_burst initialised the first `n <= want` pointers.
        let mbufs: &[*mut sys::rte_mbuf] = unsafe { core::slice::from_raw_parts(raw.as_ptr().cast(), usize::from(n)) };
        let mut delivered = 0;
        for &m in mbufs {
            let mut v = MaybeUninit::<sys::machnet_mbuf_view>::uninit();
            // SAFETY: `m` is a received mbuf; the shim fills every field of `v`.
            let v = unsafe {
                sys::machnet_mbuf_view(m, v.as_mut_ptr());
                v.assume_init()
            };
            let (ip, l4) = (v.ol_flags & RX_IP_MASK, v.ol_flags & RX_L4_MASK);
            if ip == RX_IP_BAD || l4 == RX_L4_BAD {
                self.dstats.rx_bad_checksum += 1;
                self.drop_rx(m);
                continue;
            }
            let (Some(mm), Some(data)) = (NonNull::new(m), NonNull::new(v.data)) else {
                self.dstats.rx_unusable += 1;
                self.drop_rx(m);
                continue;
            };
            if v.nb_segs != 1 || v.refcnt != 1 {
                self.dstats.rx_unusable += 1;
                self.drop_rx(m);
                continue;
            }
            self.handed += 1;
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += u64::from(v.data_len);
            out.push(DpdkBuf {
                m: mm,
                data,
                len: v.data_len,
                room: v.room,
                rx_good: ip == RX_IP_GOOD && l4 == RX_L4_GOOD,
            });
            delivered += 1;
        }
        delivered
    }
}

/// A packet buffer: one DPDK mbuf, single segment, owned exclusively. `Send`; dropping it
/// (instead of handing it back with `free` or `tx_burst`) frees the mbuf to its pool.
pub struct DpdkBuf {
    m: NonNull<sys::rte_mbuf>,
    data: NonNull<u8>,
    len: u32,
    room: u32,
    rx_good: bool,
}

// SAFETY: the mbuf is exclusively owned (reference count 1, single segment); freeing it from
// another thread is allowed (thread-safe mempool).
unsafe impl Send for DpdkBuf {}

static_assertions::const_assert!(core::mem::size_of::<DpdkBuf>() <= 32);

impl std::fmt::Debug for DpdkBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkBuf").field("len", &self.len).field("room", &self.room).finish_non_exhaustive()
    }
}

impl DpdkBuf {
    /// Gives up ownership without freeing.
    #[inline]
    fn into_raw(self) -> NonNull<sys::rte_mbuf> {
        ManuallyDrop::new(self).m
    }

    /// The underlying mbuf, for code that talks to DPDK directly. Still owned by this buffer.
    pub fn as_mbuf_ptr(&self) -> *mut sys::rte_mbuf {
        self.m.as_ptr()
    }
}

impl Drop for DpdkBuf {
    fn drop(&mut self) {
        // SAFETY: the mbuf is ours; the EAL keeps its memory mapped while OUTSTANDING can be
        // non-zero, and we decrement only after the free has completed.
        unsafe { sys::machnet_pktmbuf_free(self.m.as_ptr()) };
        OUTSTANDING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PacketBuf for DpdkBuf {
    #[inline]
    fn frame(&self) -> &[u8] {
        // SAFETY: `data` points at `room` bytes of this mbuf's data buffer (data_len +
        // tailroom), owned exclusively by `self` for its whole life; `len <= room`.
        unsafe { core::slice::from_raw_parts(self.data.as_ptr(), self.len as usize) }
    }
    #[inline]
    fn frame_mut(&mut self) -> &mut [u8] {
        self.rx_good = false;
        // SAFETY: as in `frame`, and `&mut self` makes the access unique.
        unsafe { core::slice::from_raw_parts_mut(self.data.as_ptr(), self.len as usize) }
    }
    #[inline]
    fn storage_mut(&mut self) -> &mut [u8] {
        self.rx_good = false;
        // SAFETY: as in `frame_mut`, for all `room` bytes.
        unsafe { core::slice::from_raw_parts_mut(self.data.as_ptr(), self.room as usize) }
    }
    #[inline]
    fn capacity(&self) -> usize {
        self.room as usize
    }
    #[inline]
    fn set_len(&mut self, len: usize) {
        self.len = len.min(self.room as usize) as u32;
    }
    #[inline]
    fn rx_checksum_good(&self) -> bool {
        self.rx_good
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!(DeviceSpec::parse("0000:00:04.0"), DeviceSpec::Pci("0000:00:04.0".into()));
        assert_eq!(DeviceSpec::parse("3b:00.1"), DeviceSpec::Pci("0000:3b:00.1".into()));
        let v = DeviceSpec::parse("net_memif0,role=server,socket=/tmp/x.sock");
        assert_eq!(v.name(), "net_memif0");
        assert_eq!(v.eal_args(), ["--vdev".to_string(), "net_memif0,role=server,socket=/tmp/x.sock".to_string()]);
        assert_eq!(DeviceSpec::parse("net_null0").name(), "net_null0");
        // Not PCI: device number out of range, non-hex, too many parts.
        assert!(matches!(DeviceSpec::parse("00:20.0"), DeviceSpec::Vdev(_)));
        assert!(matches!(DeviceSpec::parse("zz:00.0"), DeviceSpec::Vdev(_)));
        assert!(matches!(DeviceSpec::parse("0:0:0:0.0"), DeviceSpec::Vdev(_)));
        // Azure's synthetic NIC, as `driverctl -b vmbus set-override <GUID> uio_hv_generic`
        // names it.
        let g = DeviceSpec::parse("7A2D5B3E-1C4F-4E8A-9B6D-0F1E2D3C4B5A");
        assert_eq!(g, DeviceSpec::Vmbus("7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a".into()));
        assert_eq!(g.name(), "7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a", "netvsc names its port by the GUID");
        assert_eq!(g.eal_args(), ["-a".to_string(), "7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a".to_string()]);
        assert!(g.is_hardware());
        let g = DeviceSpec::parse("7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a,latency=0");
        assert_eq!(g.name(), "7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a");
        assert_eq!(g.eal_args()[1], "7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a,latency=0");
        // Not a GUID: wrong group lengths, non-hex.
        assert!(matches!(DeviceSpec::parse("7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5"), DeviceSpec::Vdev(_)));
        assert!(matches!(DeviceSpec::parse("ga2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a"), DeviceSpec::Vdev(_)));
        assert!(!DeviceSpec::parse("net_null0").is_hardware());
    }

    fn udp_frame() -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12] = 0x08;
        f[14] = 0x45;
        f[23] = 17;
        f
    }

    #[test]
    fn tx_offload_flags() {
        let both = TxOffload { ipv4: true, udp: true };
        let none = TxOffload { ipv4: false, udp: false };
        let f = udp_frame();
        assert_eq!(tx_offload(&f, both), (TX_IPV4 | TX_IP_CKSUM | TX_UDP_CKSUM, 14, 20));
        assert_eq!(tx_offload(&f, TxOffload { ipv4: false, udp: true }), (TX_IPV4 | TX_UDP_CKSUM, 14, 20));
        assert_eq!(tx_offload(&f, none), (0, 0, 0));
        // ICMP: only the IP header checksum.
        let mut icmp = f.clone();
        icmp[23] = 1;
        assert_eq!(tx_offload(&icmp, both), (TX_IPV4 | TX_IP_CKSUM, 14, 20));
        // Options lengthen the IP header.
        let mut opt = f.clone();
        opt[14] = 0x46;
        assert_eq!(tx_offload(&opt, both).2, 24);
        // A fragment gets no UDP offload.
        let mut frag = f.clone();
        frag[20] = 0x20;
        assert_eq!(tx_offload(&frag, both), (TX_IPV4 | TX_IP_CKSUM, 14, 20));
        // ARP, short frames, bad versions: nothing.
        let mut arp = f.clone();
        arp[13] = 0x06;
        assert_eq!(tx_offload(&arp, both), (0, 0, 0));
        assert_eq!(tx_offload(&f[..20], both), (0, 0, 0));
        let mut v6 = f;
        v6[14] = 0x65;
        assert_eq!(tx_offload(&v6, both), (0, 0, 0));
    }
}
