//! machnetd: the machnet-rs sidecar daemon.
//!
//! The daemon owns one network port and runs one engine shard per queue; applications reach
//! it through the control socket and talk to it over shared-memory channels. See
//! `docs/architecture.md` for the data path and `docs/operations.md` for running it.
#![warn(missing_docs)]

pub mod arp;
pub mod capture;
pub mod config;
pub mod controller;
#[cfg(feature = "dpdk")]
pub mod dpdk_backend;
pub mod embedded;
pub mod mesh;
pub mod metrics;
pub mod nic;
pub mod ports;
pub mod shard;
