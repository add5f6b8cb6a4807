//! System-call wrappers: the sealed memfd behind a channel, its mapping, and eventfd doorbells.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

/// Size of a huge page (the memfd size is rounded to it when hugepages are used).
pub const HUGE_PAGE: usize = 2 << 20;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; users access the shared parts
// through atomics or raw copies, never through references that assume exclusivity.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the base pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` read/write, shared.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); the arguments are valid and
        // the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: NonNull::new(p.cast()).expect("mmap returned NULL"), len })
    }

    /// First byte of the mapping (page-aligned).
    pub fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; nothing derived from it outlives
        // the value (owners drop their ring handles with it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Size of the file behind `fd`.
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer for fstat.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled `st`.
    let st = unsafe { st.assume_init() };
    usize::try_from(st.st_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// A sealed memfd and its mapping.
pub struct SealedRegion {
    /// The memfd (size sealed).
    pub fd: OwnedFd,
    /// The whole file mapped shared.
    pub map: Mapping,
    /// Whether the region is backed by huge pages.
    pub huge: bool,
}

/// Creates a memfd of at least `len` bytes, seals its size, and maps it. With `try_huge` it
/// first tries `MFD_HUGETLB` (size rounded to 2 MiB) and falls back to normal pages when
/// huge pages are unavailable. The memory is zero-filled and not populated up front.
pub fn create_sealed(name: &str, len: usize, try_huge: bool) -> io::Result<SealedRegion> {
    let cname = CString::new(name.replace('\0', "_")).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if try_huge {
        let huge_len = (len + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
        if let Ok(r) = try_create(&cname, huge_len, libc::MFD_HUGETLB) {
            return Ok(SealedRegion { fd: r.0, map: r.1, huge: true });
        }
    }
    let (fd, map) = try_create(&cname, len, 0)?;
    Ok(SealedRegion { fd, map, huge: false })
}

fn try_create(name: &CString, len: usize, extra: libc::c_uint) -> io::Result<(OwnedFd, Mapping)> {
    // SAFETY: `name` is NUL-terminated; flags are valid memfd flags.
    let raw = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | extra) })?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let off = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), off) })?;
    // Seal the size so a peer cannot shrink the file under our mapping (SIGBUS) or grow it.
    // SAFETY: plain fcntl on an fd we own.
    cvt(unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
    })?;
    let map = Mapping::map(fd.as_fd(), len)?;
    Ok((fd, map))
}

/// A read-only memfd holding `data` (written, then sealed against any change), for handing
/// a variable-length reply to a peer with `SCM_RIGHTS`.
pub fn sealed_bytes(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    let cname = CString::new(name.replace('\0', "_")).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is NUL-terminated; flags are valid memfd flags.
    let raw = cvt(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut f = std::fs::File::from(fd);
    f.write_all(data)?;
    let fd = OwnedFd::from(f);
    // SAFETY: plain fcntl on an fd we own.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    })?;
    Ok(fd)
}

/// The whole content of a file descriptor (from offset 0, whatever its file position).
pub fn read_all_at(fd: BorrowedFd<'_>, limit: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone_to_owned()?);
    let len = f.metadata()?.len() as usize;
    if len > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "reply larger than the limit"));
    }
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The seals on `fd` (`F_GET_SEALS`).
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: plain fcntl.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_long = 2;
const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_long = 4;

/// Registers this process for `MEMBARRIER_CMD_GLOBAL_EXPEDITED` barriers issued by other
/// processes (once; cached). Returns whether it worked. `MACHNET_NO_MEMBARRIER=1` disables it
/// (then the doorbell handshake uses a sequentially consistent store on every publish).
pub fn membarrier_register() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        if std::env::var_os("MACHNET_NO_MEMBARRIER").is_some_and(|v| v != "0") {
            return false;
        }
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers; no memory is passed.
        let q = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
        if q < 0 || q & MEMBARRIER_CMD_GLOBAL_EXPEDITED == 0 {
            return false;
        }
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0 }
    })
}

/// Issues a memory barrier on every running thread of every registered process (the heavy
/// side of an asymmetric fence). Returns false if the kernel refused.
pub fn membarrier_global() -> bool {
    // SAFETY: integer-only syscall.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) == 0 }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with valid flags.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Rings a doorbell: adds 1 to the eventfd counter. Errors (counter saturated) are ignored: the
/// sleeper is woken either way.
pub fn ring(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64, as eventfd requires.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Clears a doorbell (reads and discards the counter; non-blocking).
pub fn drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local u64; the fd is non-blocking.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// Waits until `fd` is readable or `timeout` passes (`None` = forever). Returns whether it is
/// readable. EINTR counts as a timeout-free wake-up (returns false).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout_ms(timeout);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(r > 0)
}

/// Waits until `fd` is readable or `watch` (a stream socket) is hung up by its peer, or
/// `timeout` passes. Returns whether `watch` hung up. EINTR returns early.
pub fn wait_readable_or_hangup(fd: BorrowedFd<'_>, watch: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfds = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: watch, events: libc::POLLRDHUP, revents: 0 },
    ];
    // SAFETY: two valid pollfds, as passed.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms(timeout)) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(pfds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
}

/// Whether the peer of stream socket `fd` closed its end (or the socket failed), without
/// waiting.
pub fn hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: a few nanoseconds to read (no TSC access), at
/// the scheduler tick's resolution — for rate-limiting checks on hot paths.
pub fn coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `poll(2)` timeout in milliseconds, rounding up so short waits do not busy-loop.
pub fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfd_cannot_change_size() {
        let r = create_sealed("machnet-test-seal", 3 * 4096, true).unwrap();
        let len = file_len(r.fd.as_fd()).unwrap();
        assert!(len >= 3 * 4096);
        assert_eq!(r.map.len(), len);
        let s = seals(r.fd.as_fd()).unwrap();
        assert_eq!(s & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL), 0x7);
        // SAFETY: plain syscall; it must fail because of the seal.
        let rc = unsafe { libc::ftruncate(r.fd.as_raw_fd(), 4096) };
        assert_eq!(rc, -1, "shrinking a sealed memfd must fail");
        // SAFETY: as above.
        let rc = unsafe { libc::ftruncate(r.fd.as_raw_fd(), (len * 2) as libc::off_t) };
        assert_eq!(rc, -1, "growing a sealed memfd must fail");
        // A second mapping sees the first one's writes (the shared-memory property).
        let m2 = Mapping::map(r.fd.as_fd(), len).unwrap();
        // SAFETY: both mappings cover at least one page; no references are formed.
        unsafe {
            r.map.base().as_ptr().add(100).write_volatile(0xAB);
            assert_eq!(m2.base().as_ptr().add(100).read_volatile(), 0xAB);
        }
    }

    #[test]
    fn doorbell_wakes_and_drains() {
        let fd = eventfd().unwrap();
        assert!(!wait_readable(fd.as_fd(), Some(Duration::ZERO)).unwrap());
        ring(fd.as_fd());
        ring(fd.as_fd());
        assert!(wait_readable(fd.as_fd(), Some(Duration::from_secs(5))).unwrap());
        drain(fd.as_fd());
        assert!(!wait_readable(fd.as_fd(), Some(Duration::ZERO)).unwrap());
    }
}
