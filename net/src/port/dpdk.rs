//! The DPDK backend: kernel-bypass ports on any device DPDK drives (behind the `dpdk` feature).
//!
//! Three layers, each owning the next's lifetime:
//!
//! * [`Eal`]: DPDK's Environment Abstraction Layer, initialised **once per process** (a second
//!   [`Eal::init`] fails with [`DpdkError::EalAlreadyInitialised`], even after cleanup). The
//!   arguments come from the caller; [`EalArgs`] builds the recommended set.
//! * [`DpdkDevice`]: one ethdev port (a vdev string such as `net_memif0,role=server,...` or a
//!   PCI address), configured with N receive/transmit queue pairs, a mempool per queue,
//!   MTU, checksum offloads when the device has them, RSS when it has that (key and RETA read
//!   back into [`Capabilities::rss`](super::Capabilities)), and started.
//! * [`DpdkPort`]: one queue pair, implementing [`Port`](super::Port), to be moved to the
//!   shard thread that polls it. Its buffers are mbufs ([`DpdkBuf`]).
//!
//! # Use
//!
//! ```no_run
//! use machnet_net::port::dpdk::{DeviceConfig, DeviceSpec, DpdkDevice, Eal, EalArgs, unique_file_prefix};
//! use machnet_net::port::{Burst, Port};
//!
//! let spec = DeviceSpec::parse("net_memif0,role=server,id=0,socket=/run/mn.sock,socket-abstract=no");
//! let eal = Eal::init(EalArgs::new(&unique_file_prefix("machnetd")).device(&spec).build())?;
//! let mut dev = DpdkDevice::open(&eal, &spec, &DeviceConfig { queues: 2, ..DeviceConfig::default() })?;
//! let caps = dev.capabilities().clone(); // MAC, MTU, RSS key + RETA, checksum handling
//! let ports = dev.take_ports(); // one per shard; move each to its thread
//! // ... shards poll `rx_burst` / `tx_burst` ...
//! drop(ports); // 1. stop polling: every DpdkPort dropped (buffers back to their pools)
//! dev.stop()?; // 2. stop the device
//! dev.close()?; // 3. close it
//! eal.shutdown()?; // 4. rte_eal_cleanup
//! # Ok::<(), machnet_net::port::dpdk::DpdkError>(())
//! ```
//!
//! # Shutdown order, and the memif pitfall
//!
//! DPDK installs no signal handler: on SIGINT/SIGTERM stop polling, drop the ports, stop and
//! close the device, then shut the EAL down. The types enforce the order: [`DpdkDevice::stop`]
//! refuses while a [`DpdkPort`] is alive (`rte_eth_rx_burst` on a stopped port is undefined),
//! a device keeps the EAL alive, and the EAL's memory is released only when no [`DpdkBuf`] is
//! alive anywhere (otherwise it is kept mapped, so a late buffer drop stays sound).
//!
//! `net_memif` in DPDK 22.11 can crash a process that is polling a queue while its peer
//! disconnects (the peer's `rte_eth_dev_stop`, close or exit unmaps the shared regions under
//! the poller). With memif, **both** sides must stop polling before **either** stops its
//! port: agree in-band (a last frame both sides recognise) or out of band, then stop, close
//! and exit. A stale memif socket file (left by a killed server) makes the next server fail
//! with "Address already in use": remove it before starting; start the server first.
//!
//! # Threads
//!
//! [`Eal::init`] pins the calling thread to the EAL main lcore's CPU, and threads spawned later
//! inherit that affinity: pin shard threads explicitly (or choose the main core with
//! [`EalArgs::main_lcore`]). Ports may be polled from any thread; [`register_thread`] gives a
//! thread an lcore id so mempool operations use a per-thread cache (faster, optional).

#[path = "dpdk_device.rs"]
mod device;
#[path = "dpdk_eal.rs"]
mod eal;

pub use device::{
    DeviceConfig, DeviceSpec, DpdkBuf, DpdkDevice, DpdkPort, DpdkPortStats, EthStats, LinkStatus, PeerSteering,
    MAX_PEER_QUEUES,
};

pub use eal::{
    af_packet_vdev, af_xdp_vdev, memif_vdev, register_thread, tsc_hz, tsc_now, unique_file_prefix, unregister_thread,
    Eal, EalArgs,
};

use core::fmt;
use machnet_dpdk_sys as sys;

/// What went wrong in the DPDK backend. Small and `Copy`; [`Display`](fmt::Display) adds
/// DPDK's own text for the error number (`rte_strerror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpdkError {
    /// The EAL was already initialised in this process; DPDK allows one initialisation per
    /// process, even after `rte_eal_cleanup`.
    EalAlreadyInitialised,
    /// The operation needs an initialised EAL.
    EalNotInitialised,
    /// An EAL argument or device string contains a NUL byte.
    NulInArgument,
    /// `rte_eal_init` failed (bad argument, no memory, device probe failure, ...).
    EalInit {
        /// DPDK's error number (`rte_errno`).
        errno: i32,
    },
    /// No DPDK port has the device's name, and hot-plugging it failed or found none. Check the
    /// device string (driver name such as `net_memif0`, or PCI address).
    DeviceNotFound {
        /// The error number of the hot-plug attempt (`rte_dev_probe`), 0 if it succeeded but
        /// created no port of that name.
        errno: i32,
    },
    /// A DPDK call failed while setting the device up or tearing it down.
    Call {
        /// The DPDK function.
        op: &'static str,
        /// Its error number (positive).
        errno: i32,
    },
    /// The device configuration is inconsistent.
    BadConfig(&'static str),
    /// The configuration asks for more than the device offers.
    Unsupported {
        /// What (queues, MTU, ...).
        what: &'static str,
        /// Requested value.
        requested: u32,
        /// The device's limit.
        limit: u32,
    },
    /// Creating the mempool of a queue failed.
    Mempool {
        /// The queue.
        queue: u16,
        /// DPDK's error number.
        errno: i32,
    },
    /// The link did not come up in time (no peer, cable, or memif client/server).
    LinkDown {
        /// How long it was waited for, in milliseconds.
        waited_ms: u64,
    },
    /// The device cannot be stopped while some of its [`DpdkPort`]s are alive: stop polling
    /// and drop them first.
    PortsInUse {
        /// Ports still alive.
        alive: usize,
    },
    /// The EAL cannot shut down while devices are open: close them first.
    DevicesOpen,
    /// Packet buffers are still alive, so the EAL's memory was left mapped (not cleaned up).
    BuffersOutstanding {
        /// How many.
        count: i64,
    },
}

fn strerror(errno: i32) -> String {
    // SAFETY: `rte_strerror` returns a pointer to a NUL-terminated string in static or
    // thread-local storage, valid until the next call on this thread; it is copied at once. It
    // needs no initialised EAL.
    unsafe {
        let p = sys::rte_strerror(errno);
        if p.is_null() {
            return format!("error {errno}");
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

impl fmt::Display for DpdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DpdkError::EalAlreadyInitialised => {
                f.write_str("DPDK's EAL is already initialised in this process (once per process, even after cleanup)")
            }
            DpdkError::EalNotInitialised => f.write_str("DPDK's EAL is not initialised"),
            DpdkError::NulInArgument => f.write_str("a DPDK argument or device string contains a NUL byte"),
            DpdkError::EalInit { errno } => {
                write!(f, "DPDK EAL initialisation failed: {} (errno {errno})", strerror(errno))
            }
            DpdkError::DeviceNotFound { errno: 0 } => {
                f.write_str("no DPDK port has this device name (check the vdev string or PCI address)")
            }
            DpdkError::DeviceNotFound { errno } => write!(
                f,
                "no DPDK port has this device name and probing it failed: {} (errno {errno}; check the driver name and \
                 its arguments)",
                strerror(errno)
            ),
            DpdkError::Call { op, errno } => write!(f, "{op} failed: {} (errno {errno})", strerror(errno)),
            DpdkError::BadConfig(why) => write!(f, "bad DPDK device configuration: {why}"),
            DpdkError::Unsupported { what, requested, limit } => {
                write!(f, "the device does not support {requested} {what} (limit {limit})")
            }
            DpdkError::Mempool { queue, errno } => {
                write!(
                    f,
                    "cannot create the mempool of queue {queue}: {} (errno {errno}; raise EAL -m?)",
                    strerror(errno)
                )
            }
            DpdkError::LinkDown { waited_ms } => write!(
                f,
                "the link did not come up within {waited_ms} ms (no peer: memif server/client not running, or the \
                 interface is down)"
            ),
            DpdkError::PortsInUse { alive } => {
                write!(f, "{alive} port(s) of the device are still alive: stop polling and drop them before stopping")
            }
            DpdkError::DevicesOpen => {
                f.write_str("DPDK devices are still open: close them before shutting the EAL down")
            }
            DpdkError::BuffersOutstanding { count } => {
                write!(f, "{count} packet buffer(s) still alive: EAL memory left mapped, rte_eal_cleanup skipped")
            }
        }
    }
}

impl std::error::Error for DpdkError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_dpdk_text() {
        let e = DpdkError::Call { op: "rte_eth_dev_configure", errno: libc::EINVAL };
        let s = e.to_string();
        assert!(s.starts_with("rte_eth_dev_configure failed: "), "{s}");
        assert!(s.contains("Invalid argument"), "{s}");
        assert!(DpdkError::LinkDown { waited_ms: 1500 }.to_string().contains("1500 ms"));
        // DPDK-specific error numbers have DPDK's own text.
        let s = DpdkError::EalInit { errno: sys::E_RTE_SECONDARY as i32 }.to_string();
        assert!(s.contains("secondary"), "{s}");
    }
}
