//! Raw bindings to the system DPDK (22.11 on Debian 12) and a C shim for its inline functions.
//!
//! Everything is generated at build time by bindgen from the headers that
//! `pkg-config libdpdk` points at, on an allowlist: `rte_*` functions and types, `RTE_*`
//! constants, and the shim's `machnet_*` functions. DPDK's fast-path functions
//! (`rte_eth_rx_burst`, `rte_pktmbuf_alloc`, `rte_errno`, `rte_lcore_id`, ...) are `static
//! inline` and have no symbol in the shared libraries: use the `machnet_*` wrappers instead, and
//! never reach the `per_lcore_*` thread-locals through these bindings.
//!
//! The crate is empty unless its `bindings` feature is on (`machnet-net`'s `dpdk` feature turns
//! it on), so the workspace builds on machines without DPDK. The safe API is
//! `machnet_net::port::dpdk`.
#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case)]
#![allow(missing_docs, clippy::all, clippy::pedantic)]

#[cfg(feature = "bindings")]
mod generated {
    #![allow(unsafe_op_in_unsafe_fn, improper_ctypes, dead_code, unnecessary_transmutes)]
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

#[cfg(feature = "bindings")]
pub use generated::*;

#[cfg(all(test, feature = "bindings"))]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_constants_match_the_headers() {
        // The mbuf is two cache lines; the shim view is what the Rust side relies on.
        assert_eq!(core::mem::size_of::<rte_mbuf>(), 128);
        assert_eq!(RTE_ETH_RETA_GROUP_SIZE, 64);
        // Function-like-macro constants are evaluated by clang.
        assert_eq!(RTE_ETH_RSS_NONFRAG_IPV4_UDP, 1 << 5);
        assert_eq!(RTE_ETH_RX_OFFLOAD_IPV4_CKSUM, 1 << 1);
        assert_eq!(RTE_MBUF_F_RX_IP_CKSUM_GOOD, 1 << 7);
        assert_eq!(RTE_MBUF_F_TX_UDP_CKSUM, 3 << 52);
    }

    #[test]
    fn shim_links_and_runs_without_eal() {
        // SAFETY: reads a thread-local initialised to LCORE_ID_ANY; needs no EAL.
        let id = unsafe { machnet_lcore_id() };
        assert_eq!(id, u32::MAX, "a thread that is not an EAL lcore has LCORE_ID_ANY");
        // SAFETY: reads the TSC.
        let (a, b) = unsafe { (machnet_rdtsc(), machnet_rdtsc()) };
        assert!(b >= a);
    }
}
