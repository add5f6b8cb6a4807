//! What a shard does when it finds no work.
//!
//! `Busy` spins: lowest latency, one core burnt per shard — right on dedicated cores.
//! `Adaptive` spins for `spin`, then calls `sched_yield` until `spin + yield_for`, then parks
//! in `epoll_wait` on the shard's [`Parker`] until woken or until its next timer. With more
//! busy pollers than cores, spinning turns microseconds into milliseconds (a poller only runs
//! when the scheduler preempts the other), so adaptive is the default when shards outnumber
//! free cores.
//!
//! Parking without losing a wake-up: the shard sets its `sleeping` flag, fences, re-checks for
//! work ([`Pipeline::before_park`](crate::shard::Pipeline::before_park)) and only then waits;
//! a producer publishes work, fences, and writes the eventfd only if it sees the flag. Either
//! the shard sees the work or the producer sees the flag.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The idle policy of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin; never sleep.
    Busy,
    /// Spin, then yield, then park.
    Adaptive {
        /// Idle time spent spinning before yielding.
        spin: Duration,
        /// Further idle time spent yielding before parking.
        yield_for: Duration,
        /// Longest single park (an upper bound on timer lateness if nobody wakes the shard).
        max_park: Duration,
    },
}

impl IdlePolicy {
    /// Adaptive with 50 µs of spinning, 200 µs of yielding, parks of at most 100 ms.
    pub const ADAPTIVE: IdlePolicy = IdlePolicy::Adaptive {
        spin: Duration::from_micros(50),
        yield_for: Duration::from_micros(200),
        max_park: Duration::from_millis(100),
    };

    /// `Busy` if every shard (plus one core for the controller and the applications) can have
    /// a core of its own, `ADAPTIVE` otherwise.
    pub fn default_for(shards: usize) -> IdlePolicy {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if shards < cores {
            IdlePolicy::Busy
        } else {
            IdlePolicy::ADAPTIVE
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Wakes a parked shard. Cheap to clone; `Send` and `Sync`.
#[derive(Debug, Clone)]
pub struct Waker {
    efd: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
    wakes: Arc<AtomicU64>,
}

impl Waker {
    /// Call after publishing work the shard should see: writes the eventfd if the shard is
    /// (about to be) parked.
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.force();
        }
    }

    /// Writes the eventfd unconditionally.
    pub fn force(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd this struct keeps open.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }

    /// The eventfd, for a producer that signals it directly.
    pub fn raw_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

/// Adds and removes fds that wake a parked shard, from any thread (the shard's own, when it
/// adopts a channel). Cheap to clone.
#[derive(Debug, Clone)]
pub struct FdSet {
    epfd: Arc<OwnedFd>,
}

impl FdSet {
    /// Wakes from parking when `fd` becomes readable. `token` is informational. The caller
    /// keeps `fd` open until [`remove`](Self::remove).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: `ev` is a valid epoll_event; both descriptors are open.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event argument since Linux 2.6.9.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, core::ptr::null_mut()) })?;
        Ok(())
    }
}

/// The shard's side of parking: an eventfd and an epoll set that can hold more fds (channel
/// doorbells, a port's socket).
#[derive(Debug)]
pub struct Parker {
    epfd: Arc<OwnedFd>,
    efd: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
    wakes: Arc<AtomicU64>,
}

const WAKE_TOKEN: u64 = u64::MAX;

impl Parker {
    /// A new parker with its eventfd registered.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscalls creating new descriptors; ownership is taken immediately.
        let efd = unsafe { OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?) };
        // SAFETY: as above.
        let epfd = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let p = Parker {
            epfd: Arc::new(epfd),
            efd: Arc::new(efd),
            sleeping: Arc::new(AtomicBool::new(false)),
            wakes: Arc::new(AtomicU64::new(0)),
        };
        p.add_fd(p.efd.as_raw_fd(), WAKE_TOKEN)?;
        Ok(p)
    }

    /// A waker for this parker.
    pub fn waker(&self) -> Waker {
        Waker { efd: self.efd.clone(), sleeping: self.sleeping.clone(), wakes: self.wakes.clone() }
    }

    /// The flag producers check; the shard sets it while parked.
    pub fn sleeping_flag(&self) -> &Arc<AtomicBool> {
        &self.sleeping
    }

    /// The set of fds that wake this parker, for registering more later.
    pub fn fd_set(&self) -> FdSet {
        FdSet { epfd: self.epfd.clone() }
    }

    /// Wakes from parking when `fd` becomes readable (see [`FdSet::add`]).
    pub fn add_fd(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.fd_set().add(fd, token)
    }

    /// Stops watching `fd`.
    pub fn remove_fd(&self, fd: RawFd) -> io::Result<()> {
        self.fd_set().remove(fd)
    }

    /// Marks the shard sleeping (then the caller re-checks for work).
    pub fn prepare(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Clears the sleeping mark without waiting.
    pub fn cancel(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Waits until a watched fd is readable or `timeout` passes, then clears the mark and
    /// drains the eventfd. Returns true if woken by an fd.
    pub fn park(&self, timeout: Duration) -> bool {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // Microsecond timeouts (a port without an fd is polled by short parks) need
        // epoll_pwait2 (Linux 5.11); epoll_wait rounds up to milliseconds.
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `evs` has room for 8 events, as passed; `ts` is a valid timespec; a null
        // signal mask leaves the mask unchanged.
        let mut n = unsafe { libc::epoll_pwait2(self.epfd.as_raw_fd(), evs.as_mut_ptr(), 8, &ts, core::ptr::null()) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: as above.
            n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), evs.as_mut_ptr(), 8, ms) };
        }
        self.sleeping.store(false, Ordering::Relaxed);
        let mut drain = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from the non-blocking eventfd.
        let _ = unsafe { libc::read(self.efd.as_raw_fd(), drain.as_mut_ptr().cast(), 8) };
        n > 0
    }

    /// Times the shard was woken through its eventfd.
    pub fn wake_count(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn waker_interrupts_park_and_timeout_bounds_it() {
        let p = Parker::new().unwrap();
        let w = p.waker();
        // Not sleeping: wake() does not write.
        w.wake();
        assert_eq!(p.wake_count(), 0);
        let t = Instant::now();
        p.prepare();
        assert!(!p.park(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(25));
        p.prepare();
        let w2 = w.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w2.wake();
        });
        let t = Instant::now();
        assert!(p.park(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5));
        th.join().unwrap();
        assert_eq!(p.wake_count(), 1);
    }

    #[test]
    fn registered_fd_wakes() {
        let p = Parker::new().unwrap();
        let other = Parker::new().unwrap();
        p.add_fd(other.waker().raw_fd(), 7).unwrap();
        other.waker().force();
        p.prepare();
        assert!(p.park(Duration::from_secs(5)));
        p.remove_fd(other.waker().raw_fd()).unwrap();
    }
}
