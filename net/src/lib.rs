//! Wire formats, RSS hashing and packet ports for machnet-rs.
//!
//! The crate is the bottom layer of the stack:
//!
//! * [`wire`]: typed views over byte slices and validated `Repr`s for Ethernet II, ARP, IPv4,
//!   UDP, ICMP echo and the 54-byte Machnet header, plus a whole-frame classifier. No `unsafe`.
//! * [`rss`]: the Toeplitz hash, RETA lookup and the "RSS--" client source-port search that
//!   makes a NIC's receive-side scaling steer a flow's replies to the core that owns it.
//! * [`port`]: the [`port::Port`] trait (burst receive/transmit of pooled packet buffers) and
//!   its backends: an in-process pair with a seeded fault injector, and a UDP tunnel.
//! * [`time`]: the [`time::Instant`] newtype every layer above uses; nothing here reads a clock
//!   except the UDP backend's socket calls.
//!
//! # Without the standard library
//!
//! The `std` feature (on by default) brings the `mem`, `udp` and `dpdk` ports, the shared
//! buffer pools and [`testutil`]. Without it the crate is `#![no_std]` and needs only `alloc`:
//! [`wire`], [`rss`], [`time`], the [`port::Port`] trait, [`port::HeapBuf`], [`port::Pool`] and
//! the [`port::fault`] injector build for bare-metal targets such as `x86_64-unknown-none`.
//!
//! # Example: build a Machnet SYN and classify it back
//!
//! ```
//! use machnet_net::wire::{self, ChecksumCaps, MachnetRepr, PacketType, FrameRepr, Frame};
//! use std::net::Ipv4Addr;
//!
//! let repr = FrameRepr {
//!     src_mac: wire::EthernetAddress([2, 0, 0, 0, 0, 1]),
//!     dst_mac: wire::EthernetAddress([2, 0, 0, 0, 0, 2]),
//!     src_ip: Ipv4Addr::new(198, 18, 0, 1),
//!     dst_ip: Ipv4Addr::new(198, 18, 0, 2),
//!     src_port: 1024,
//!     dst_port: 888,
//!     hdr: MachnetRepr::control(PacketType::Syn, 7, 0),
//! };
//! let mut buf = [0u8; 256];
//! let len = repr.emit(&mut buf, 0, ChecksumCaps::software()).unwrap();
//! assert_eq!(len, 96);
//! match wire::classify(&buf[..len], ChecksumCaps::software()).unwrap() {
//!     Frame::Machnet(m) => {
//!         assert_eq!(m.hdr.packet_type, PacketType::Syn);
//!         assert_eq!(m.hdr.seqno, 7);
//!         assert!(m.payload.is_empty());
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod port;
pub mod rss;
#[cfg(feature = "std")]
pub mod testutil;
pub mod time;
pub mod wire;
