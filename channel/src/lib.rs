//! The shared-memory channel between applications and the machnet-rs daemon.
//!
//! An application registers over a unix socket ([`ctrl`]) and receives, for each channel it
//! attaches, a sealed memfd with one [`layout`]: single-producer/single-consumer [`ring`]s
//! carrying message descriptors, control requests and returned buffers, and two buffer pools.
//! The TX pool belongs to the application (its private free list, [`pool`]), the RX pool to the
//! engine; buffers cross over only through the rings, and the engine side ([`engine`]) checks
//! every index, length and chain it reads, so a buggy or hostile application can break only its
//! own channel. The application side is the Rust [`client`] (and, with the `tokio` feature,
//! its asynchronous form `asyncio`) and the C library ([`capi`],
//! `include/machnet.h`, built as `libmachnet.so` / `libmachnet.a`). [`testing`] has an engine
//! that serves the control protocol and echoes or forwards messages, for tests.
//!
//! # Example: an engine and an application in one process
//!
//! ```
//! use machnet::client::Channel;
//! use machnet::engine::EngineChannel;
//! use machnet::layout::{ChannelConfig, MachnetFlow};
//!
//! let cfg = ChannelConfig { tx_bufs: 64, rx_bufs: 64, tx_ring: 16, rx_ring: 16, ..ChannelConfig::DEFAULT };
//! let (mut engine, fds) = EngineChannel::create(&cfg, "doc", false)?;
//! let mut app = Channel::from_fds(fds)?;
//! let flow = MachnetFlow { src_ip: 1, dst_ip: 2, src_port: 3, dst_port: 4 };
//!
//! app.send(flow, b"ping")?;
//! let msg = engine.poll_tx().unwrap().unwrap();
//! let mut payload = [0u8; 4];
//! engine.read_seg(msg.head, &mut payload);
//! engine.free_tx(msg.head); // acknowledged: the buffer goes back to the app
//!
//! let rx = engine.alloc_rx(b"pong").unwrap();
//! engine.deliver(flow.reversed(), rx, 1, 4).unwrap();
//! engine.flush();
//!
//! let mut buf = [0u8; 16];
//! let (n, from) = app.recv(&mut buf)?.unwrap();
//! assert_eq!((&payload, &buf[..n], from), (b"ping", &b"pong"[..], flow.reversed()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod asyncio;
pub mod capi;
pub mod client;
pub mod ctrl;
pub mod engine;
pub mod layout;
pub mod ops;
pub mod pool;
mod region;
pub mod ring;
pub mod shm;
pub mod testing;

pub use layout::{ChannelConfig, MachnetFlow, MSG_MAX_LEN};
pub use ops::{Event, EventKind, Status};
