//! An asynchronous channel for tokio (cargo feature `tokio`).
//!
//! [`AsyncChannel`] wraps a [`Channel`]: `recv`, `send`, `connect`, `listen`, `close` and the
//! flow events are futures. A future that cannot finish yet announces a wait on the channel's
//! doorbell (the eventfd the engine rings, exactly as for [`Channel::recv_blocking`]) and awaits
//! it through [`tokio::io::unix::AsyncFd`]: no busy polling and no thread per channel, so one
//! task can serve many flows and one runtime many channels. [`send`](AsyncChannel::send)
//! waits for TX buffers (or a TX-ring slot) instead of failing with `NoBuffers` (`RingFull`):
//! while it waits the channel asks the engine to ring after returning buffers (`want_tx` in the
//! layout's sleep flag). The registration socket is watched too, so a daemon that dies fails
//! every pending future with [`Error::DaemonGone`].
//!
//! Registering ([`Machnet::connect`](crate::client::Machnet::connect)) and attaching a channel
//! are short blocking calls on the control socket (bounded by its timeout): do them at start-up
//! or in `spawn_blocking`. The runtime needs its IO and time drivers (`enable_all`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), machnet::client::Error> {
//! use machnet::asyncio::AsyncChannel;
//! use machnet::client::Machnet;
//! use std::net::Ipv4Addr;
//!
//! let m = Machnet::init()?;
//! let mut ch = AsyncChannel::new(m.attach()?)?;
//! let flow = ch.connect(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2), 888).await?;
//! ch.send(flow, b"hello").await?;
//! let mut buf = vec![0u8; 1 << 20];
//! let (n, from) = ch.recv(&mut buf).await?;
//! println!("{n} bytes from {from}");
//! # Ok(()) }
//! ```
//!
//! Every future may be dropped (a `select!`, a timeout) without losing anything: a message is
//! taken off the ring only when the future returns it, and a cancelled `connect` is remembered
//! like a timed-out one (a late success is closed).

use crate::client::{Channel, Error, PollPolicy, Watch};
use crate::layout::MachnetFlow;
use crate::ops::{CtrlOp, Event};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What [`AsyncChannel::recv_or_event`] found first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A message of this length on this flow (src = remote sender) is in the buffer.
    Message(usize, MachnetFlow),
    /// An unsolicited event: a flow closed by its peer, a flow failed, a message refused, ...
    Event(Event),
}

/// A [`Channel`] whose waiting calls are futures. `Send`, not `Sync`, like the channel.
pub struct AsyncChannel {
    // Dropped before `ch`: deregistered while the channel is still mapped.
    bell: AsyncFd<OwnedFd>,
    reg: Option<AsyncFd<OwnedFd>>,
    ch: Channel,
}

impl std::fmt::Debug for AsyncChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannel").field("channel", &self.ch).finish_non_exhaustive()
    }
}

/// Ends a wait when the future that began it finishes or is dropped.
struct Waiting<'a>(&'a mut Channel);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.end_wait();
    }
}

impl AsyncChannel {
    /// Wraps `ch` (from [`Machnet::attach`](crate::client::Machnet::attach)). Call it inside a
    /// tokio runtime with IO enabled. `Err(Protocol)` for a channel without doorbells (from
    /// [`Channel::bind`]).
    pub fn new(mut ch: Channel) -> Result<AsyncChannel, Error> {
        let os = |e: std::io::Error| Error::Os(e.raw_os_error().unwrap_or(libc::EIO));
        let watch = |fd: OwnedFd| {
            // SAFETY: (tokio's I/O-safety contract) the `OwnedFd` is a duplicate that only the
            // `AsyncFd` owns; nothing replaces or closes it while it is registered.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| os(std::io::Error::from(e)))
        };
        let bell = watch(ch.app_bell().ok_or(Error::Protocol)?.try_clone_to_owned().map_err(os)?)?;
        let reg = match ch.registration_dup() {
            Some(fd) => Some(watch(fd.map_err(os)?)?),
            None => None,
        };
        // Empty calls must not give the thread away: the futures wait on the doorbell instead.
        ch.set_poll_policy(PollPolicy::Spin);
        Ok(AsyncChannel { bell, reg, ch })
    }

    /// The channel (for its statistics, id, layout).
    pub fn get_ref(&self) -> &Channel {
        &self.ch
    }

    /// The channel back.
    pub fn into_inner(self) -> Channel {
        self.ch
    }

    /// Waits until the engine may have produced what `w` needs (or the daemon died).
    async fn wait(&mut self, w: Watch) -> Result<(), Error> {
        if self.ch.begin_wait(w) {
            self.ch.end_wait();
            return Ok(());
        }
        let guard = Waiting(&mut self.ch);
        let bell = async {
            if let Ok(mut g) = self.bell.readable().await {
                g.clear_ready();
            }
        };
        let gone = async {
            match &self.reg {
                Some(reg) => match reg.readable().await {
                    Ok(mut g) => {
                        g.clear_ready();
                    }
                    Err(_) => std::future::pending::<()>().await,
                },
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = bell => {}
            () = gone => {}
        }
        drop(guard);
        // The registration socket woke us (or the channel closed): say why, if it is gone.
        self.ch.check_daemon()
    }

    /// Receives one message into `buf`; waits until there is one. `Err(TooSmall)` if `buf` is
    /// shorter than the message (which is then discarded); `Err(Closed)` or `Err(DaemonGone)`
    /// once the channel cannot deliver anything more.
    pub async fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, MachnetFlow), Error> {
        loop {
            if let Some(r) = self.ch.recv(buf)? {
                return Ok(r);
            }
            // Events wait in the local queue for `event`; left in the CQ they would keep the
            // doorbell from ever being waited on.
            self.ch.queue_events()?;
            self.wait(Watch::Rx).await?;
        }
    }

    /// The next message or unsolicited event, whichever comes first (events first if both
    /// wait): for a task that serves flows and must learn when their peers close them.
    pub async fn recv_or_event(&mut self, buf: &mut [u8]) -> Result<Incoming, Error> {
        loop {
            if let Some(ev) = self.ch.poll_event() {
                return Ok(Incoming::Event(ev));
            }
            if let Some((n, flow)) = self.ch.recv(buf)? {
                return Ok(Incoming::Message(n, flow));
            }
            if self.ch.queue_events()? {
                continue;
            }
            self.wait(Watch::Rx).await?;
        }
    }

    /// The next unsolicited event (flow closed by its peer, flow failed, message refused, ...).
    pub async fn event(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(ev) = self.ch.poll_event() {
                return Ok(ev);
            }
            self.ch.check_daemon()?;
            self.wait(Watch::Cq).await?;
        }
    }

    /// Sends `data` on `flow` (src = local end); waits while the TX ring is full or the TX
    /// buffers are all in flight, instead of failing with `RingFull` or `NoBuffers`. Returns
    /// once the message is queued, as [`Channel::send`].
    pub async fn send(&mut self, flow: MachnetFlow, data: &[u8]) -> Result<(), Error> {
        if data.len().div_ceil(self.ch.layout().cfg.mss.max(1) as usize) > self.ch.layout().cfg.tx_bufs as usize {
            // More buffers than the pool has: waiting would never end.
            return Err(Error::NoBuffers);
        }
        loop {
            match self.ch.send(flow, data) {
                Err(Error::RingFull) => self.wait(Watch::TxRing).await?,
                Err(Error::NoBuffers) => self.wait(Watch::TxBuffers).await?,
                r => return r,
            }
        }
    }

    async fn ctrl(&mut self, op: CtrlOp) -> Result<MachnetFlow, Error> {
        let deadline = tokio::time::Instant::now() + self.ch.ctrl_timeout();
        let id = loop {
            if let Some(id) = self.ch.ctrl_submit(op)? {
                break id;
            }
            self.ch.queue_events()?;
            match tokio::time::timeout_at(deadline, self.wait(Watch::Cq)).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::TimedOut),
            }
        };
        // A connect dropped before its completion is abandoned, as one that timed out.
        struct Pending<'a> {
            ch: &'a mut AsyncChannel,
            id: u64,
            connect: bool,
            done: bool,
        }
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                if !self.done && self.connect {
                    self.ch.ch.ctrl_abandon(self.id);
                }
            }
        }
        let mut p = Pending { ch: self, id, connect: matches!(op, CtrlOp::Connect { .. }), done: false };
        loop {
            if let Some(r) = p.ch.ch.ctrl_poll(id)? {
                p.done = true;
                return r.map_err(Error::Daemon);
            }
            match tokio::time::timeout_at(deadline, p.ch.wait(Watch::Cq)).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::TimedOut),
            }
        }
    }

    /// Listens on `ip:port`.
    pub async fn listen(&mut self, ip: Ipv4Addr, port: u16) -> Result<(), Error> {
        self.ctrl(CtrlOp::Listen { ip, port }).await.map(|_| ())
    }

    /// Connects `local_ip` to `remote_ip:remote_port`; the flow to send on (src = local, with
    /// the daemon's chosen port). Fails with `TimedOut` after the control timeout (5 s).
    pub async fn connect(
        &mut self,
        local_ip: Ipv4Addr,
        remote_ip: Ipv4Addr,
        remote_port: u16,
    ) -> Result<MachnetFlow, Error> {
        if remote_ip.is_unspecified() || remote_ip.is_broadcast() {
            return Err(Error::InvalidAddress);
        }
        self.ctrl(CtrlOp::Connect { local_ip, remote_ip, remote_port }).await
    }

    /// Closes a flow this channel owns.
    pub async fn close(&mut self, flow: MachnetFlow) -> Result<(), Error> {
        self.ctrl(CtrlOp::Close { flow }).await.map(|_| ())
    }
}
