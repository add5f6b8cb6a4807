//! The DPDK backend: EAL start-up, the device with one queue pair per shard, and the ordered
//! shutdown (built with the `dpdk` feature).

use crate::config::{Config, DpdkSection};
use machnet_net::port::dpdk::{unique_file_prefix, DeviceConfig, DeviceSpec, DpdkDevice, DpdkPort, Eal, EalArgs};
use machnet_net::wire::EthernetAddress;
use std::time::Duration;

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
        Self::open_device(device, &d, queues, cfg.mac)
    }

    /// Starts the EAL and opens `device` (PCI address or vdev string) with `queues` queue pairs
    /// and MAC `mac`, set up as `d` says.
    pub fn open_device(
        device: &str,
        d: &DpdkSection,
        queues: u16,
        mac: EthernetAddress,
    ) -> Result<(DpdkBackend, Vec<DpdkPort>), String> {
        let mut device = device.to_string();
        if device.starts_with("net_memif") && !device.contains("mac=") {
            // memif cannot change its MAC once started, but takes one at creation.
            device = format!("{device},mac={mac}");
        }
        let device = device.as_str();
        let spec = DeviceSpec::parse(device);
        let pci = matches!(spec, DeviceSpec::Pci(_));
        let mut args = EalArgs::new(&unique_file_prefix("machnetd"))
            .hugepages(d.hugepages.unwrap_or(pci))
            .memory_mb(d.memory_mb.unwrap_or(256))
            .log_level(if log::log_enabled!(log::Level::Debug) { "notice" } else { "error" })
            .device(&spec);
        for a in &d.eal_args {
            args = args.arg(a);
        }
        let argv = args.build();
        log::info!("DPDK EAL arguments: {}", argv.join(" "));
        // The EAL pins this thread to its main lcore; shard threads would inherit that, so the
        // affinity is restored afterwards (shards are pinned by cpu_mask, if given).
        let saved = affinity();
        // The error text starts with "DPDK EAL initialisation failed".
        let eal = Eal::init(argv).map_err(|e| e.to_string())?;
        if let Some(s) = saved {
            set_affinity(&s);
        }
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
            link_timeout: match d.link_timeout_ms.unwrap_or(10_000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            ..DeviceConfig::default()
        };
        let mut dev = match DpdkDevice::open(&eal, &spec, &dc) {
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
            if caps.rss.is_some() { "on (client ports steered to their shard)" } else { "off (software hand-off)" },
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
            // notes the disconnect while idle, closes later.
            std::thread::sleep(Duration::from_millis(if client { 250 } else { 750 }));
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
