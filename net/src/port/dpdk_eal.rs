//! EAL start-up and shut-down, argument helpers, lcore registration and the TSC.

use super::device::DeviceSpec;
use super::DpdkError;
use machnet_dpdk_sys as sys;
use std::ffi::{c_char, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Set by the first [`Eal::init`] of the process, successful or not: DPDK allows one.
static EAL_CLAIMED: AtomicBool = AtomicBool::new(false);
/// True between a successful `rte_eal_init` and `rte_eal_cleanup`.
static EAL_LIVE: AtomicBool = AtomicBool::new(false);

/// Packet buffers alive outside any port: buffers handed out (`alloc`, `rx_burst`) by ports
/// that have since been dropped, minus those returned to a port, minus those dropped on their
/// own ([`DpdkBuf`](super::DpdkBuf)'s `Drop`, which decrements after freeing). Ports add their
/// balance when dropped, so while any port is alive this undercounts, but then no device and no
/// EAL can be torn down either. The EAL frees mempools and unmaps memory only when it is zero.
pub(super) static OUTSTANDING: AtomicI64 = AtomicI64::new(0);

/// A mempool pointer waiting to be freed at EAL shutdown.
pub(super) struct PoolPtr(pub(super) *mut sys::rte_mempool);

// SAFETY: a mempool is process-wide shared memory; its pointer may be passed between threads.
// The pools are only freed once, by the EAL's last owner, after every device is closed.
unsafe impl Send for PoolPtr {}

struct EalInner {
    /// Mempools of closed devices, freed just before `rte_eal_cleanup` (a device's transmit
    /// ring or a buffer may hold mbufs of another device's pool until then).
    pools: Mutex<Vec<PoolPtr>>,
    /// Cleanup was attempted (it is not retried).
    done: AtomicBool,
}

/// The initialised EAL of this process. Cloning shares it; devices hold a clone. When the last
/// clone is dropped (or [`Eal::shutdown`] is called on it) the deferred mempools are freed and
/// `rte_eal_cleanup` runs, unless packet buffers are still alive (then memory stays mapped).
/// Drop or shut down on the thread that called [`Eal::init`].
#[derive(Clone)]
pub struct Eal {
    inner: Arc<EalInner>,
}

impl std::fmt::Debug for Eal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eal").field("handles", &Arc::strong_count(&self.inner)).finish()
    }
}

impl Eal {
    /// Initialises DPDK's EAL with `args` (without argv[0], which this supplies). Fails with
    /// DPDK's error text on a bad argument or a failed device probe, and with
    /// [`DpdkError::EalAlreadyInitialised`] on any second call in the process.
    pub fn init(args: Vec<String>) -> Result<Eal, DpdkError> {
        let prog = std::env::args().next().unwrap_or_else(|| "machnet".to_string());
        let mut owned = Vec::with_capacity(args.len() + 1);
        for a in std::iter::once(prog).chain(args) {
            owned.push(CString::new(a).map_err(|_| DpdkError::NulInArgument)?);
        }
        if EAL_CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(DpdkError::EalAlreadyInitialised);
        }
        // EAL may keep pointers into argv (and getopt permutes the array): both live for the
        // rest of the process.
        let strings: &'static mut [CString] = Box::leak(owned.into_boxed_slice());
        let argv: &'static mut [*mut c_char] =
            Box::leak(strings.iter().map(|s| s.as_ptr() as *mut c_char).collect::<Vec<_>>().into_boxed_slice());
        let argc = argv.len() as i32;
        // SAFETY: `argv` holds `argc` pointers to NUL-terminated strings that are never freed;
        // EAL may permute the array, which is exclusively its own. EAL_CLAIMED makes this the
        // only call in the process.
        let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if rc < 0 {
            // SAFETY: reads this thread's `rte_errno`, set by the failed call.
            let errno = unsafe { sys::machnet_errno() };
            remove_runtime_dir();
            return Err(DpdkError::EalInit { errno });
        }
        EAL_LIVE.store(true, Ordering::SeqCst);
        // libbpf and libxdp (loaded with the af_xdp driver) print whatever EAL's log level;
        // they create their sockets and programs at queue set-up, after this.
        // SAFETY: looks the two libraries up with RTLD_NOLOAD and sets their print callbacks
        // to NULL (silence); harmless when they are not loaded.
        unsafe { sys::machnet_silence_bpf_logs() };
        Ok(Eal { inner: Arc::new(EalInner { pools: Mutex::new(Vec::new()), done: AtomicBool::new(false) }) })
    }

    /// True if the EAL of this process is initialised and not yet cleaned up.
    pub fn is_live() -> bool {
        EAL_LIVE.load(Ordering::SeqCst)
    }

    /// Shuts the EAL down: frees the mempools of closed devices and calls `rte_eal_cleanup`.
    /// Fails with [`DpdkError::DevicesOpen`] if a device (or another clone of this handle) is
    /// alive, and with [`DpdkError::BuffersOutstanding`] if packet buffers are still alive (the
    /// memory then stays mapped; nothing is freed).
    pub fn shutdown(self) -> Result<(), DpdkError> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner.cleanup(),
            Err(_) => Err(DpdkError::DevicesOpen),
        }
    }

    pub(super) fn defer_pool_free(&self, pool: PoolPtr) {
        self.inner.pools.lock().unwrap_or_else(|e| e.into_inner()).push(pool);
    }
}

impl EalInner {
    fn cleanup(&self) -> Result<(), DpdkError> {
        if self.done.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let count = OUTSTANDING.load(Ordering::Acquire);
        if count != 0 {
            return Err(DpdkError::BuffersOutstanding { count });
        }
        let pools = core::mem::take(&mut *self.pools.lock().unwrap_or_else(|e| e.into_inner()));
        for p in pools {
            // SAFETY: every device is closed (devices hold the EAL), no buffer is alive
            // (OUTSTANDING is zero), so nothing references the pool's objects; each pool is in
            // the list once.
            unsafe { sys::rte_mempool_free(p.0) };
        }
        EAL_LIVE.store(false, Ordering::SeqCst);
        // SAFETY: called once (the last owner of the EAL), after every device was closed.
        let rc = unsafe { sys::rte_eal_cleanup() };
        remove_runtime_dir();
        if rc < 0 {
            return Err(DpdkError::Call { op: "rte_eal_cleanup", errno: -rc });
        }
        Ok(())
    }
}

impl Drop for EalInner {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            // Only reachable through an implicit drop; `shutdown` reports the error itself.
            log::warn!("DPDK EAL shutdown: {e}");
        }
    }
}

/// Removes the EAL's runtime directory (`/var/run/dpdk/<prefix>`) if it is empty: with
/// `--no-shconf` DPDK 22.11 creates it, puts nothing in it, and never removes it.
fn remove_runtime_dir() {
    // SAFETY: returns a pointer to a static NUL-terminated buffer (empty before the EAL set it).
    let p = unsafe { sys::rte_eal_get_runtime_dir() };
    if p.is_null() {
        return;
    }
    // SAFETY: see above; copied at once.
    let dir = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned();
    if !dir.is_empty() {
        // Fails harmlessly if the directory holds files (another process's, or a shared config).
        let _ = std::fs::remove_dir(&dir);
    }
}

/// The recommended EAL arguments, built step by step.
///
/// Defaults (measured on the project's machine, see `docs/architecture.md`): `--no-huge -m 256
/// --no-shconf --no-pci --file-prefix <prefix> --no-telemetry --log-level=error`, which lets
/// several DPDK processes coexist and leaves nothing on disk. The file prefix must be unique
/// per process ([`unique_file_prefix`]).
#[derive(Debug, Clone)]
pub struct EalArgs {
    file_prefix: String,
    memory_mb: u32,
    hugepages: bool,
    main_lcore: Option<u32>,
    log_level: String,
    devices: Vec<DeviceSpec>,
    extra: Vec<String>,
}

impl EalArgs {
    /// The recommended set with this file prefix.
    pub fn new(file_prefix: &str) -> Self {
        EalArgs {
            file_prefix: file_prefix.to_string(),
            memory_mb: 256,
            hugepages: false,
            main_lcore: None,
            log_level: "error".to_string(),
            devices: Vec::new(),
            extra: Vec::new(),
        }
    }
    /// Memory reserved without hugepages (`-m`), MB. Default 256.
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }
    /// Uses reserved hugepages with `--in-memory` (no hugetlbfs mount needed, nothing left on
    /// disk) instead of `--no-huge -m`: for benchmarks. Needs `/proc/sys/vm/nr_hugepages`.
    pub fn hugepages(mut self, on: bool) -> Self {
        self.hugepages = on;
        self
    }
    /// Runs the EAL main lcore (the calling thread) on this CPU (`-l <cpu>`).
    pub fn main_lcore(mut self, cpu: u32) -> Self {
        self.main_lcore = Some(cpu);
        self
    }
    /// EAL log level (`--log-level=`). Default `error`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }
    /// Adds a device: `--vdev <string>` for a virtual device, `-a <address>` for PCI (which
    /// also drops `--no-pci`).
    pub fn device(mut self, spec: &DeviceSpec) -> Self {
        self.devices.push(spec.clone());
        self
    }
    /// Appends any other EAL argument.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }
    /// The argument list for [`Eal::init`].
    pub fn build(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if let Some(cpu) = self.main_lcore {
            a.extend(["-l".to_string(), cpu.to_string()]);
        }
        if self.hugepages {
            a.push("--in-memory".to_string());
        } else {
            a.extend(["--no-huge".to_string(), "-m".to_string(), self.memory_mb.to_string()]);
            a.push("--no-shconf".to_string());
        }
        if !self.devices.iter().any(DeviceSpec::is_hardware) {
            a.push("--no-pci".to_string());
        }
        a.extend(["--file-prefix".to_string(), self.file_prefix.clone()]);
        a.push("--no-telemetry".to_string());
        a.push(format!("--log-level={}", self.log_level));
        for d in &self.devices {
            let [flag, value] = d.eal_args();
            a.extend([flag, value]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A file prefix unique to this process and call: `<tag>-<pid>-<n>`.
pub fn unique_file_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The vdev string of a memif port on a socket file (not abstract). The path must not contain
/// a comma. Remove a stale socket file before starting a server; start the server first.
pub fn memif_vdev(index: u16, server: bool, socket: &Path) -> String {
    let role = if server { "server" } else { "client" };
    format!("net_memif{index},role={role},id=0,socket={},socket-abstract=no", socket.display())
}

/// The vdev string of an `af_packet` port on a kernel interface, `queues` queue pairs, qdisc
/// bypassed.
pub fn af_packet_vdev(index: u16, iface: &str, queues: u16) -> String {
    format!("net_af_packet{index},iface={iface},qpairs={queues},qdisc_bypass=1")
}

/// The vdev string of an `af_xdp` port on a kernel interface's queues `0..queues`.
pub fn af_xdp_vdev(index: u16, iface: &str, queues: u16) -> String {
    format!("net_af_xdp{index},iface={iface},start_queue=0,queue_count={queues}")
}

/// Registers the calling (non-EAL) thread with DPDK so it gets an lcore id and mempool
/// operations use a per-thread cache. Optional: ports work from any thread. Returns the lcore
/// id.
pub fn register_thread() -> Result<u32, DpdkError> {
    if !Eal::is_live() {
        return Err(DpdkError::EalNotInitialised);
    }
    // SAFETY: the EAL is initialised; the call only touches this thread's lcore state.
    let rc = unsafe { sys::rte_thread_register() };
    if rc < 0 {
        // SAFETY: reads this thread's `rte_errno`.
        let errno = unsafe { sys::machnet_errno() };
        return Err(DpdkError::Call { op: "rte_thread_register", errno });
    }
    // SAFETY: reads this thread's lcore id.
    Ok(unsafe { sys::machnet_lcore_id() })
}

/// Releases the lcore id of a thread registered with [`register_thread`]. Call before the
/// thread exits.
pub fn unregister_thread() {
    if Eal::is_live() {
        // SAFETY: the EAL is initialised; a thread without an lcore id is left unchanged.
        unsafe { sys::rte_thread_unregister() };
    }
}

/// The time-stamp counter (DPDK's `rte_rdtsc`).
#[inline]
pub fn tsc_now() -> u64 {
    // SAFETY: reads the TSC; no preconditions.
    unsafe { sys::machnet_rdtsc() }
}

/// TSC ticks per second as calibrated by the EAL; 0 before [`Eal::init`].
pub fn tsc_hz() -> u64 {
    if !Eal::is_live() {
        return 0;
    }
    // SAFETY: reads a value the EAL set at initialisation.
    unsafe { sys::machnet_tsc_hz() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommended_args() {
        let vdev = DeviceSpec::parse("net_null0,size=64");
        let a = EalArgs::new("t-1").device(&vdev).main_lcore(1).build();
        assert_eq!(
            a.join(" "),
            "-l 1 --no-huge -m 256 --no-shconf --no-pci --file-prefix t-1 --no-telemetry --log-level=error \
             --vdev net_null0,size=64"
        );
        let pci = DeviceSpec::parse("00:04.0");
        let a = EalArgs::new("t-2").hugepages(true).device(&pci).build();
        assert_eq!(a.join(" "), "--in-memory --file-prefix t-2 --no-telemetry --log-level=error -a 0000:00:04.0");
        // Azure's route: the synthetic NIC's GUID for netvsc, hugepages, and the PCI bus left on
        // (netvsc takes over the accelerated-networking VF with the same MAC from it).
        let vmbus = DeviceSpec::parse("7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a");
        let a = EalArgs::new("t-3").hugepages(true).device(&vmbus).build();
        assert_eq!(
            a.join(" "),
            "--in-memory --file-prefix t-3 --no-telemetry --log-level=error -a 7a2d5b3e-1c4f-4e8a-9b6d-0f1e2d3c4b5a"
        );
        assert_ne!(unique_file_prefix("x"), unique_file_prefix("x"));
    }

    #[test]
    fn vdev_strings() {
        assert_eq!(
            memif_vdev(0, true, Path::new("/tmp/a.sock")),
            "net_memif0,role=server,id=0,socket=/tmp/a.sock,socket-abstract=no"
        );
        assert_eq!(af_packet_vdev(1, "veth0", 2), "net_af_packet1,iface=veth0,qpairs=2,qdisc_bypass=1");
        assert_eq!(af_xdp_vdev(0, "veth0", 1), "net_af_xdp0,iface=veth0,start_queue=0,queue_count=1");
    }

    #[test]
    fn nothing_needs_an_eal_before_init() {
        // These unit tests run without an EAL (threads of one test process; EAL scenarios run
        // as child processes in net/tests/dpdk_*.rs).
        assert!(!Eal::is_live());
        assert_eq!(tsc_hz(), 0);
        assert_eq!(register_thread(), Err(DpdkError::EalNotInitialised));
        assert!(tsc_now() > 0);
    }
}
