//! The DPDK backend: EAL start-up, the device with one queue pair per shard, and the ordered
//! shutdown (built with the `dpdk` feature).

use crate::config::{Config, DpdkSection};
use machnet_net::port::dpdk::{
    unique_file_prefix, DeviceConfig, DeviceSpec, DpdkDevice, DpdkPort, Eal, EalArgs, PeerSteering,
};
use machnet_net::wire::EthernetAddress;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Start-up steps, for the watchdog's message.
const STEPS: [&str; 3] = ["EAL initialisation (rte_eal_init)", "device set-up", "done"];

/// Exits the process if start-up is still at a step other than "done" after `limit`: DPDK's
/// calls cannot be interrupted, and a daemon that neither starts nor exits is the worst
/// outcome for whoever started it.
fn watchdog(step: Arc<AtomicU8>, limit: Duration) {
    let spawned = std::thread::Builder::new().name("machnetd-start".into()).spawn(move || {
        let t = Instant::now();
        while t.elapsed() < limit {
            if usize::from(step.load(Ordering::Acquire)) == STEPS.len() - 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let at = STEPS[usize::from(step.load(Ordering::Acquire)).min(STEPS.len() - 1)];
        eprintln!(
            "machnetd: DPDK start-up did not finish within {:.1} s (stuck in {at}); exiting \
             (machnet_rs.dpdk.start_timeout_ms)",
            limit.as_secs_f64()
        );
        std::process::exit(1);
    });
    if let Err(e) = spawned {
        log::warn!("no start-up watchdog: {e}");
    }
}

/// The first CPU this thread may run on: the EAL's only lcore.
fn first_cpu(set: &libc::cpu_set_t) -> Option<u32> {
    // SAFETY: CPU_ISSET reads one bit of a valid set, for i below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).find(|&i| unsafe { libc::CPU_ISSET(i, set) }).map(|i| i as u32)
}

/// A running DPDK device and its EAL; the ports go to the shards.
pub struct DpdkBackend {
    eal: Eal,
    dev: DpdkDevice,
    /// A memif device: `Some(true)` in the client role.
    memif: Option<bool>,
}

/// The calling thread's CPU affinity.
fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; the call writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        (libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: pins the calling thread to a set read from the kernel earlier.
    unsafe {
        libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), set);
    }
}

impl DpdkBackend {
    /// Starts the EAL and opens the configured device with `cfg.engine_threads` queue pairs;
    /// returns the backend and one port per shard. Errors carry DPDK's own text.
    pub fn open(cfg: &Config) -> Result<(DpdkBackend, Vec<DpdkPort>), String> {
        let d = cfg.ext.dpdk.clone().unwrap_or_default();
        let device = cfg.dpdk_device.as_deref().ok_or("the dpdk backend has no device configured")?;
        let queues = u16::try_from(cfg.engine_threads).unwrap_or(u16::MAX);
        let steering = cfg.memif_steering.as_ref().map(|m| PeerSteering {
            key: m.rss_key.clone(),
            peer_queues: m.peer_queues,
            peer_key: m.peer_rss_key.clone(),
        });
        Self::open_device(device, &d, queues, cfg.mac, steering)
    }

    /// Starts the EAL and opens `device` (PCI address or vdev string) with `queues` queue pairs
    /// (ports), MAC `mac` and, on memif, the sender-side steering `steering`, set up as `d`
    /// says.
    pub fn open_device(
        device: &str,
        d: &DpdkSection,
        queues: u16,
        mac: EthernetAddress,
        steering: Option<PeerSteering>,
    ) -> Result<(DpdkBackend, Vec<DpdkPort>), String> {
        let mut device = device.to_string();
        if device.starts_with("net_memif") && !device.contains("mac=") {
            // memif cannot change its MAC once started, but takes one at creation.
            device = format!("{device},mac={mac}");
        }
        let device = device.as_str();
        let spec = DeviceSpec::parse(device);
        let pci = spec.is_hardware();
        let mut args = EalArgs::new(&unique_file_prefix("machnetd"))
            .hugepages(d.hugepages.unwrap_or(pci))
            .memory_mb(d.memory_mb.unwrap_or(256))
            .log_level(if log::log_enabled!(log::Level::Debug) { "notice" } else { "error" })
            .device(&spec);
        // The EAL pins this thread to its main lcore; shard threads would inherit that, so the
        // affinity is restored afterwards (shards are pinned by cpu_mask, if given).
        let saved = affinity();
        // One lcore, the main one, unless the configuration names its own: the shards are our
        // threads, not EAL lcores, so worker lcores would only be idle threads pinned to every
        // CPU, and EAL's start-up hand-shake with them over pipes (rte_eal_remote_launch) is a
        // step that was seen to block forever at start-up.
        let user_lcores = d.eal_args.iter().any(|a| matches!(a.as_str(), "-l" | "-c" | "--lcores" | "--main-lcore"));
        if let Some(cpu) = saved.as_ref().and_then(first_cpu).filter(|_| !user_lcores) {
            args = args.main_lcore(cpu);
        }
        for a in &d.eal_args {
            args = args.arg(a);
        }
        let argv = args.build();
        log::info!("DPDK EAL arguments: {}", argv.join(" "));
        let link_ms = d.link_timeout_ms.unwrap_or(10_000);
        let step = Arc::new(AtomicU8::new(0));
        watchdog(step.clone(), Duration::from_millis(d.start_timeout_ms.unwrap_or(link_ms + 20_000)));
        let done = || step.store((STEPS.len() - 1) as u8, Ordering::Release);
        // The error text starts with "DPDK EAL initialisation failed".
        let eal = Eal::init(argv).map_err(|e| {
            done();
            e.to_string()
        })?;
        if let Some(s) = saved {
            set_affinity(&s);
        }
        step.store(1, Ordering::Release);
        let dc = DeviceConfig {
            queues,
            mtu: d.mtu.unwrap_or(1500),
            mbufs_per_queue: d.mbufs_per_queue.unwrap_or(8191),
            rx_descriptors: d.rx_descriptors.unwrap_or(1024),
            tx_descriptors: d.tx_descriptors.unwrap_or(1024),
            promiscuous: d.promiscuous.unwrap_or(false),
            mac: Some(mac),
            checksum_offload: d.checksum_offload.unwrap_or(true),
            rss: d.rss.unwrap_or(true),
            link_timeout: match link_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            peer_steering: steering,
            ..DeviceConfig::default()
        };
        let opened = DpdkDevice::open(&eal, &spec, &dc);
        done();
        let mut dev = match opened {
            Ok(dev) => dev,
            Err(e) => {
                let msg = format!("cannot open DPDK device {device:?}: {e}");
                if let Err(e2) = eal.shutdown() {
                    log::warn!("DPDK EAL shutdown: {e2}");
                }
                return Err(msg);
            }
        };
        let caps = dev.capabilities().clone();
        log::info!(
            "DPDK device {} (driver {}): MAC {}, MTU {}, {} queue(s), RSS {}, checksums {:?}, link {}",
            dev.name(),
            dev.driver(),
            caps.mac,
            caps.mtu,
            caps.queues,
            match (&dc.peer_steering, &caps.rss) {
                (Some(st), _) => format!(
                    "by the sender (memif steering: {} queue pair(s), peer with {} queue(s))",
                    queues * st.peer_queues,
                    st.peer_queues
                ),
                (None, Some(_)) => "on (client ports steered to their shard)".to_string(),
                (None, None) => "off (software hand-off)".to_string(),
            },
            caps.checksum,
            match dev.link() {
                Ok(l) if l.up => format!("up {} Mb/s", l.speed_mbps),
                Ok(_) => "down".to_string(),
                Err(e) => format!("unknown ({e})"),
            }
        );
        let memif = (dev.driver() == "net_memif")
            .then(|| device.split(',').any(|a| a.trim() == "role=client" || a.trim() == "role=slave"));
        let ports = dev.take_ports();
        Ok((DpdkBackend { eal, dev, memif }, ports))
    }

    /// The device, for status displays: name and driver.
    pub fn describe(&self) -> String {
        format!("DPDK {} ({})", self.dev.name(), self.dev.driver())
    }

    /// Stops and closes the device and cleans the EAL up. Call after every shard has stopped
    /// and dropped its port.
    pub fn close(mut self) {
        if let Some(client) = self.memif {
            // DPDK 22.11's memif can crash a peer that still polls (or is closing its own port)
            // when this side disconnects. When both sides shut down together, both stop polling
            // within ~150 ms; then the client disconnects first and the server, which only
            // notes the disconnect while idle, closes once it has (or after 750 ms).
            if client {
                std::thread::sleep(Duration::from_millis(250));
            } else {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(750) && self.dev.link().is_ok_and(|l| l.up) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Err(e) = self.dev.stop() {
            log::warn!("DPDK device stop: {e}");
        }
        if let Err(e) = self.dev.close() {
            log::warn!("DPDK device close: {e}");
        }
        if let Err(e) = self.eal.shutdown() {
            log::warn!("DPDK EAL shutdown: {e}");
        }
    }
}
