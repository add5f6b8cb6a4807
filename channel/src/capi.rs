//! The C ABI declared in `include/machnet.h`: thin wrappers over [`crate::client`].
//!
//! Every function validates its pointers (NULL is an error, never a crash), records a static
//! error text for `machnet_last_error()`, and follows the original's return conventions.
//! Channel handles are `Box<Channel>` pointers; the caller must not use one channel from two
//! threads at once (as with the original).

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::{offset_of, size_of};
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use static_assertions::const_assert_eq;

use crate::client::{Channel, Error, Machnet};
use crate::layout::{MachnetFlow, MSG_FLAG_NOTIFY_DELIVERY};
use crate::ops::{EventKind, Status};

/// `MachnetIovec_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MachnetIovec {
    /// Start of the bytes.
    pub base: *mut c_void,
    /// Length in bytes.
    pub len: usize,
}

/// `MachnetMsgHdr_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MachnetMsgHdr {
    /// Total message size.
    pub msg_size: u32,
    /// Flow.
    pub flow_info: MachnetFlow,
    /// Gather/scatter list.
    pub msg_iov: *mut MachnetIovec,
    /// Elements of `msg_iov`.
    pub msg_iovlen: usize,
    /// `MACHNET_MSGBUF_NOTIFY_DELIVERY` or 0.
    pub flags: u16,
}

/// `MachnetEvent_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MachnetEvent {
    /// `MACHNET_EVENT_*`.
    pub kind: u32,
    /// Status code.
    pub status: u32,
    /// Flow concerned.
    pub flow: MachnetFlow,
    /// Detail.
    pub aux: u32,
}

const_assert_eq!(size_of::<MachnetIovec>(), 16);
const_assert_eq!(offset_of!(MachnetIovec, len), 8);
const_assert_eq!(size_of::<MachnetMsgHdr>(), 40);
const_assert_eq!(offset_of!(MachnetMsgHdr, flow_info), 4);
const_assert_eq!(offset_of!(MachnetMsgHdr, msg_iov), 16);
const_assert_eq!(offset_of!(MachnetMsgHdr, msg_iovlen), 24);
const_assert_eq!(offset_of!(MachnetMsgHdr, flags), 32);
const_assert_eq!(size_of::<MachnetEvent>(), 24);

/// The registration socket (`int g_ctrl_socket`), −1 before `machnet_init` succeeds.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut g_ctrl_socket: c_int = -1;

static MACHNET: Mutex<Option<Machnet>> = Mutex::new(None);

thread_local! {
    static LAST_ERROR: Cell<&'static CStr> = const { Cell::new(c"ok") };
}

fn status_text(s: Status) -> &'static CStr {
    match s {
        Status::Ok => c"daemon refused: ok",
        Status::BadRequest => c"daemon refused: bad request",
        Status::BadVersion => c"daemon refused: unsupported protocol version",
        Status::NotRegistered => c"daemon refused: not registered",
        Status::AlreadyRegistered => c"daemon refused: already registered",
        Status::NoSuchChannel => c"daemon refused: no such channel",
        Status::NoResources => c"daemon refused: out of resources",
        Status::AddrNotLocal => c"daemon refused: address is not local",
        Status::AddrInUse => c"daemon refused: address in use",
        Status::NoSuchFlow => c"daemon refused: no such flow",
        Status::Unreachable => c"daemon refused: peer unreachable",
        Status::TimedOut => c"daemon refused: timed out",
        Status::Refused => c"daemon refused: connection refused",
        Status::NotPermitted => c"daemon refused: not permitted",
        Status::Closed => c"daemon refused: closed",
        Status::Internal => c"daemon refused: internal error",
        Status::Unknown(_) => c"daemon refused: unknown status",
    }
}

fn error_text(e: Error) -> &'static CStr {
    match e {
        Error::Os(libc::ENOENT) => c"cannot reach the daemon: no control socket (ENOENT)",
        Error::Os(libc::ECONNREFUSED) => c"cannot reach the daemon: connection refused",
        Error::Os(libc::EACCES) => c"cannot reach the daemon: permission denied",
        Error::Os(libc::EBADF) => c"bad file descriptor",
        Error::Os(_) => c"system call failed",
        Error::Daemon(s) => status_text(s),
        Error::Protocol => c"malformed reply or channel",
        Error::TimedOut => c"timed out waiting for the daemon",
        Error::InvalidLength => c"message length must be 1..=8388608 bytes and match the iovecs",
        Error::InvalidAddress => c"invalid IPv4 address",
        Error::RingFull => c"transmit ring full",
        Error::NoBuffers => c"no free transmit buffers",
        Error::TooSmall { .. } => c"receive buffer too small; message discarded",
        Error::Closed => c"channel closed by the daemon",
        Error::DaemonGone => c"the daemon is gone (its registration connection closed)",
    }
}

/// The `errno` a failed call leaves: the system's own for system-call failures, the closest
/// POSIX meaning otherwise (docs/channel.md lists them).
fn errno_of(e: Error) -> c_int {
    match e {
        Error::Os(e) => e,
        Error::Daemon(s) => match s {
            Status::NotPermitted => libc::EPERM,
            Status::AddrInUse => libc::EADDRINUSE,
            Status::AddrNotLocal => libc::EADDRNOTAVAIL,
            Status::Refused => libc::ECONNREFUSED,
            Status::Unreachable => libc::EHOSTUNREACH,
            Status::TimedOut => libc::ETIMEDOUT,
            Status::NoResources => libc::ENOBUFS,
            Status::NoSuchFlow | Status::Closed => libc::ENOTCONN,
            Status::NotRegistered | Status::NoSuchChannel => libc::EBADF,
            Status::BadRequest | Status::BadVersion => libc::EINVAL,
            _ => libc::EIO,
        },
        Error::Protocol => libc::EPROTO,
        Error::TimedOut => libc::ETIMEDOUT,
        Error::InvalidLength | Error::InvalidAddress => libc::EINVAL,
        Error::RingFull => libc::EAGAIN,
        Error::NoBuffers => libc::ENOBUFS,
        Error::TooSmall { .. } => libc::EMSGSIZE,
        Error::Closed => libc::ESHUTDOWN,
        Error::DaemonGone => libc::ECONNRESET,
    }
}

fn set_error(e: &'static CStr) {
    LAST_ERROR.with(|c| c.set(e));
}

fn fail<T>(e: Error, ret: T) -> T {
    set_error(error_text(e));
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = errno_of(e) };
    ret
}

/// # Safety
///
/// `p` is NULL or a pointer returned by `machnet_attach`/`machnet_bind` and not yet detached,
/// used by one thread at a time (the header's contract).
unsafe fn channel<'a>(p: *const c_void) -> Option<&'a mut Channel> {
    if p.is_null() {
        set_error(c"NULL channel");
        return None;
    }
    // SAFETY: per the contract, `p` came from Box::into_raw(Box<Channel>) and is not aliased
    // by another live call.
    Some(unsafe { &mut *(p as *mut Channel) })
}

/// # Safety
///
/// `p` is NULL or a NUL-terminated string.
unsafe fn parse_ip(p: *const c_char) -> Option<Ipv4Addr> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated by contract.
    unsafe { CStr::from_ptr(p) }.to_str().ok()?.trim().parse().ok()
}

/// # Safety
///
/// `iov` points to `n` valid iovecs (or `n` is 0).
unsafe fn iovecs<'a>(iov: *const MachnetIovec, n: usize) -> Option<&'a [MachnetIovec]> {
    if n == 0 {
        return Some(&[]);
    }
    if iov.is_null() {
        return None;
    }
    // SAFETY: caller contract.
    Some(unsafe { std::slice::from_raw_parts(iov, n) })
}

/// # Safety
///
/// Each element's `base` points to `len` readable bytes (or `len` is 0).
unsafe fn gather(v: &[MachnetIovec]) -> Option<impl Iterator<Item = &[u8]> + Clone> {
    if v.iter().any(|e| e.base.is_null() && e.len != 0) {
        return None;
    }
    Some(v.iter().map(|e| {
        if e.len == 0 {
            &[][..]
        } else {
            // SAFETY: caller contract; non-null checked above.
            unsafe { std::slice::from_raw_parts(e.base as *const u8, e.len) }
        }
    }))
}

/// `int machnet_init(void)`.
#[no_mangle]
pub extern "C" fn machnet_init() -> c_int {
    let mut g = MACHNET.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_some() {
        return 0;
    }
    match Machnet::init() {
        Ok(m) => {
            // SAFETY: written only here, under the MACHNET lock; C readers race only with this
            // single store of an int, as with the original.
            unsafe { g_ctrl_socket = m.ctrl_fd() };
            *g = Some(m);
            0
        }
        Err(e) => fail(e, -1),
    }
}

/// `void *machnet_attach(void)`.
#[no_mangle]
pub extern "C" fn machnet_attach() -> *mut c_void {
    let m = MACHNET.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(m) = m else {
        set_error(c"machnet_init() has not succeeded");
        return std::ptr::null_mut();
    };
    match m.attach() {
        Ok(ch) => Box::into_raw(Box::new(ch)).cast(),
        Err(e) => fail(e, std::ptr::null_mut()),
    }
}

/// `MachnetChannelCtx_t *machnet_bind(int shm_fd, size_t *channel_size)`.
///
/// # Safety
///
/// `channel_size` is NULL or writable; `shm_fd` is owned by the caller and handed over.
#[no_mangle]
pub unsafe extern "C" fn machnet_bind(shm_fd: c_int, channel_size: *mut usize) -> *mut c_void {
    if !channel_size.is_null() {
        // SAFETY: writable by contract.
        unsafe { *channel_size = 0 };
    }
    // SAFETY: fcntl on any integer is harmless; it only tells whether the fd is open.
    if shm_fd < 0 || unsafe { libc::fcntl(shm_fd, libc::F_GETFD) } < 0 {
        set_error(c"bad file descriptor");
        return std::ptr::null_mut();
    }
    // SAFETY: the fd is open and the caller hands it over; from here it is closed exactly once
    // (by the mapping code on success, or by this OwnedFd's drop on failure).
    let fd = unsafe { OwnedFd::from_raw_fd(shm_fd) };
    match Channel::bind(fd) {
        Ok(ch) => {
            if !channel_size.is_null() {
                // SAFETY: writable by contract.
                unsafe { *channel_size = ch.mapped_len() };
            }
            Box::into_raw(Box::new(ch)).cast()
        }
        Err(e) => fail(e, std::ptr::null_mut()),
    }
}

/// `int machnet_listen(void *ch, const char *local_ip, uint16_t port)`.
///
/// # Safety
///
/// `channel_ctx` as for every channel call; `local_ip` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn machnet_listen(channel_ctx: *mut c_void, local_ip: *const c_char, port: u16) -> c_int {
    // SAFETY: forwarded contracts.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    // SAFETY: forwarded contract.
    let Some(ip) = (unsafe { parse_ip(local_ip) }) else {
        set_error(error_text(Error::InvalidAddress));
        return -libc::EINVAL;
    };
    match ch.listen(ip, port) {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// `int machnet_connect(void *ch, const char *local_ip, const char *remote_ip, uint16_t remote_port, MachnetFlow_t *flow)`.
///
/// # Safety
///
/// Strings NULL or NUL-terminated; `flow` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn machnet_connect(
    channel_ctx: *mut c_void,
    local_ip: *const c_char,
    remote_ip: *const c_char,
    remote_port: u16,
    flow: *mut MachnetFlow,
) -> c_int {
    // SAFETY: forwarded contracts.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    // SAFETY: forwarded contracts.
    let (Some(local), Some(remote)) = (unsafe { parse_ip(local_ip) }, unsafe { parse_ip(remote_ip) }) else {
        return fail(Error::InvalidAddress, -1);
    };
    match ch.connect(local, remote, remote_port) {
        Ok(f) => {
            if !flow.is_null() {
                // SAFETY: writable by contract.
                unsafe { *flow = f };
            }
            0
        }
        Err(e) => fail(e, -1),
    }
}

/// `int machnet_send(const void *ch, MachnetFlow_t flow, const void *buf, size_t len)`.
///
/// # Safety
///
/// `buf` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn machnet_send(
    channel_ctx: *const c_void,
    flow: MachnetFlow,
    buf: *const c_void,
    len: usize,
) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    if buf.is_null() || len == 0 || len > crate::MSG_MAX_LEN {
        return fail(Error::InvalidLength, -1);
    }
    // SAFETY: caller contract.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
    match ch.send(flow, data) {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// # Safety
///
/// `ch` valid; `h` points to a valid header whose iovecs are readable.
unsafe fn sendmsg_one(ch: &mut Channel, h: &MachnetMsgHdr) -> c_int {
    // SAFETY: caller contract.
    let Some(v) = (unsafe { iovecs(h.msg_iov, h.msg_iovlen) }) else { return fail(Error::InvalidLength, -1) };
    let sum = v.iter().try_fold(0usize, |a, e| a.checked_add(e.len));
    if sum != Some(h.msg_size as usize) {
        return fail(Error::InvalidLength, -1);
    }
    // SAFETY: caller contract.
    let Some(segs) = (unsafe { gather(v) }) else { return fail(Error::InvalidLength, -1) };
    match ch.send_segs(h.flow_info, h.msg_size as usize, segs, h.flags as u32 & MSG_FLAG_NOTIFY_DELIVERY) {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// `int machnet_sendmsg(const void *ch, const MachnetMsgHdr_t *msghdr)`.
///
/// # Safety
///
/// `msghdr` NULL or valid, with readable iovecs.
#[no_mangle]
pub unsafe extern "C" fn machnet_sendmsg(channel_ctx: *const c_void, msghdr: *const MachnetMsgHdr) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    if msghdr.is_null() {
        return fail(Error::InvalidLength, -1);
    }
    // SAFETY: non-null, valid by contract.
    unsafe { sendmsg_one(ch, &*msghdr) }
}

/// `int machnet_sendmmsg(const void *ch, const MachnetMsgHdr_t *msghdrs, int vlen)`.
///
/// # Safety
///
/// `msghdrs` points to `vlen` valid headers.
#[no_mangle]
pub unsafe extern "C" fn machnet_sendmmsg(
    channel_ctx: *const c_void,
    msghdrs: *const MachnetMsgHdr,
    vlen: c_int,
) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    if msghdrs.is_null() || vlen <= 0 {
        return 0;
    }
    let mut sent = 0;
    for i in 0..vlen as usize {
        // SAFETY: i < vlen, valid by contract.
        if unsafe { sendmsg_one(ch, &*msghdrs.add(i)) } != 0 {
            break;
        }
        sent += 1;
    }
    sent
}

fn recv_result(r: Result<Option<(usize, MachnetFlow)>, Error>, flow: *mut MachnetFlow) -> isize {
    match r {
        Ok(None) => 0,
        Ok(Some((n, f))) => {
            if !flow.is_null() {
                // SAFETY: the public functions document `flow` as NULL or writable.
                unsafe { *flow = f };
            }
            n as isize
        }
        Err(e) => fail(e, -1),
    }
}

/// `ssize_t machnet_recv(const void *ch, void *buf, size_t len, MachnetFlow_t *flow)`.
///
/// # Safety
///
/// `buf` points to `len` writable bytes; `flow` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn machnet_recv(
    channel_ctx: *const c_void,
    buf: *mut c_void,
    len: usize,
    flow: *mut MachnetFlow,
) -> isize {
    // SAFETY: forwarded contracts.
    unsafe { machnet_recv_blocking(channel_ctx, buf, len, flow, 0) }
}

/// `ssize_t machnet_recv_blocking(const void *ch, void *buf, size_t len, MachnetFlow_t *flow, int64_t timeout_us)`.
///
/// # Safety
///
/// As `machnet_recv`.
#[no_mangle]
pub unsafe extern "C" fn machnet_recv_blocking(
    channel_ctx: *const c_void,
    buf: *mut c_void,
    len: usize,
    flow: *mut MachnetFlow,
    timeout_us: i64,
) -> isize {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    let data: &mut [u8] = if len == 0 || buf.is_null() {
        &mut []
    } else {
        // SAFETY: caller contract.
        unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }
    };
    let r = if timeout_us == 0 {
        ch.recv(data)
    } else {
        ch.recv_blocking(data, u64::try_from(timeout_us).ok().map(Duration::from_micros))
    };
    recv_result(r, flow)
}

/// # Safety
///
/// `h` valid with writable iovecs.
unsafe fn recvmsg_impl(ch: &mut Channel, h: &mut MachnetMsgHdr, timeout_us: i64) -> c_int {
    // SAFETY: caller contract.
    let Some(v) = (unsafe { iovecs(h.msg_iov, h.msg_iovlen) }) else { return fail(Error::InvalidLength, -1) };
    if v.iter().any(|e| e.base.is_null() && e.len != 0) {
        return fail(Error::InvalidLength, -1);
    }
    let cap = v.iter().fold(0usize, |a, e| a.saturating_add(e.len));
    let deadline =
        u64::try_from(timeout_us).ok().and_then(|us| std::time::Instant::now().checked_add(Duration::from_micros(us)));
    loop {
        let segs = v.iter().filter(|e| e.len != 0).map(|e| {
            // SAFETY: non-null (checked), `len` writable bytes by contract; the iovecs do not
            // overlap each other (caller contract, as for readv).
            unsafe { std::slice::from_raw_parts_mut(e.base.cast::<u8>(), e.len) }
        });
        match ch.recv_segs(cap, segs) {
            Ok(Some((n, f))) => {
                ch.after_poll(false);
                h.msg_size = n as u32;
                h.flow_info = f;
                return 1;
            }
            Ok(None) => {}
            Err(e) => return fail(e, -1),
        }
        if timeout_us == 0 {
            // Nothing: a polling application gives the CPU away as MACHNET_POLL says.
            ch.after_poll(true);
            return 0;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return 0;
        }
        // Wait for the next message without consuming it: a zero-capacity probe would discard
        // it, so use the channel's own wait.
        if let Err(e) = ch.wait_until(deadline) {
            return fail(e, -1);
        }
    }
}

/// `int machnet_recvmsg(const void *ch, MachnetMsgHdr_t *msghdr)`.
///
/// # Safety
///
/// `msghdr` NULL or valid, with writable iovecs.
#[no_mangle]
pub unsafe extern "C" fn machnet_recvmsg(channel_ctx: *const c_void, msghdr: *mut MachnetMsgHdr) -> c_int {
    // SAFETY: forwarded contracts.
    unsafe { machnet_recvmsg_blocking(channel_ctx, msghdr, 0) }
}

/// `int machnet_recvmsg_blocking(const void *ch, MachnetMsgHdr_t *msghdr, int64_t timeout_us)`.
///
/// # Safety
///
/// As `machnet_recvmsg`.
#[no_mangle]
pub unsafe extern "C" fn machnet_recvmsg_blocking(
    channel_ctx: *const c_void,
    msghdr: *mut MachnetMsgHdr,
    timeout_us: i64,
) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    if msghdr.is_null() {
        return fail(Error::InvalidLength, -1);
    }
    // SAFETY: non-null, valid by contract.
    unsafe { recvmsg_impl(ch, &mut *msghdr, timeout_us) }
}

/// `int machnet_close(void *ch, MachnetFlow_t flow)`.
///
/// # Safety
///
/// `channel_ctx` as for every channel call.
#[no_mangle]
pub unsafe extern "C" fn machnet_close(channel_ctx: *mut c_void, flow: MachnetFlow) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    match ch.close(flow) {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// `int machnet_detach(void *ch)`.
///
/// # Safety
///
/// `channel_ctx` NULL or a live channel; invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn machnet_detach(channel_ctx: *mut c_void) -> c_int {
    if channel_ctx.is_null() {
        set_error(c"NULL channel");
        return -1;
    }
    // SAFETY: created by Box::into_raw in attach/bind, not yet detached (contract).
    let ch = unsafe { Box::from_raw(channel_ctx.cast::<Channel>()) };
    match ch.detach() {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// `int machnet_poll_event(const void *ch, MachnetEvent_t *event)`.
///
/// # Safety
///
/// `event` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn machnet_poll_event(channel_ctx: *const c_void, event: *mut MachnetEvent) -> c_int {
    // SAFETY: forwarded contract.
    let Some(ch) = (unsafe { channel(channel_ctx) }) else { return -1 };
    if event.is_null() {
        set_error(c"NULL event");
        return -1;
    }
    match ch.poll_event() {
        Some(ev) => {
            let kind = match ev.kind {
                EventKind::Unknown(c) => c,
                k => k.code(),
            };
            // SAFETY: writable by contract.
            unsafe { *event = MachnetEvent { kind, status: ev.status.code(), flow: ev.flow, aux: ev.aux } };
            1
        }
        None => 0,
    }
}

/// `const char *machnet_last_error(void)`.
#[no_mangle]
pub extern "C" fn machnet_last_error() -> *const c_char {
    LAST_ERROR.with(|c| c.get()).as_ptr()
}
