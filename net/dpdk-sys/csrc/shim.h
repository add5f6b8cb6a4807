/*
 * machnet-dpdk-sys: the header bindgen reads, and the C shim that exports DPDK's static inline
 * functions (which have no symbol in the shared libraries) as real functions.
 *
 * Every shim symbol starts with `machnet_`.
 */
#ifndef MACHNET_DPDK_SHIM_H
#define MACHNET_DPDK_SHIM_H

#include <stdint.h>

#include <rte_common.h>
#include <rte_errno.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_log.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>
#include <rte_dev.h>
#include <rte_bus_vdev.h>
#include <rte_version.h>

/* What the Rust side needs to know about one packet buffer, read in one call. */
struct machnet_mbuf_view {
	/* First byte of the frame (buf_addr + data_off). */
	uint8_t *data;
	/* Bytes in the first segment. */
	uint32_t data_len;
	/* data_len + tailroom: how many bytes can be written from `data`. */
	uint32_t room;
	/* Offload flags (RX flags after receive). */
	uint64_t ol_flags;
	/* Segments in the chain (1 for a contiguous frame). */
	uint16_t nb_segs;
	/* Reference count (1: nobody else holds this buffer). */
	uint16_t refcnt;
};

/* --- errors, lcores, time ------------------------------------------------------------------ */
int machnet_errno(void);
unsigned machnet_lcore_id(void);
unsigned machnet_socket_id(void);
uint64_t machnet_rdtsc(void);
uint64_t machnet_tsc_hz(void);

/* --- ethdev fast path ------------------------------------------------------------------------ */
uint16_t machnet_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t machnet_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);

/* --- mbufs ----------------------------------------------------------------------------------- */
struct rte_mbuf *machnet_pktmbuf_alloc(struct rte_mempool *mp);
int machnet_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned n);
void machnet_pktmbuf_free(struct rte_mbuf *m);
void machnet_pktmbuf_reset(struct rte_mbuf *m);
uint8_t *machnet_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t machnet_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t machnet_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint16_t machnet_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t machnet_pktmbuf_tailroom(const struct rte_mbuf *m);
uint8_t *machnet_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
uint64_t machnet_mbuf_ol_flags(const struct rte_mbuf *m);
void machnet_mbuf_set_ol_flags(struct rte_mbuf *m, uint64_t flags);
void machnet_mbuf_set_tx_lens(struct rte_mbuf *m, uint8_t l2_len, uint16_t l3_len);
/* A freshly allocated buffer (length 0) and its view, or NULL if the pool is empty. */
struct rte_mbuf *machnet_mbuf_alloc_view(struct rte_mempool *mp, struct machnet_mbuf_view *v);
/* The view of a buffer (after receive). */
void machnet_mbuf_view(struct rte_mbuf *m, struct machnet_mbuf_view *v);
/* Makes a single-segment buffer `len` bytes long and sets the TX offload fields in one call. */
void machnet_mbuf_prepare_tx(struct rte_mbuf *m, uint16_t len, uint64_t ol_flags, uint8_t l2_len,
			     uint16_t l3_len);

/* --- logging --------------------------------------------------------------------------------- */
/* Silences libbpf and libxdp if the process has loaded them (the af_xdp driver does); they print
 * to stderr whatever EAL's log level. Returns how many of the two were silenced. */
int machnet_silence_bpf_logs(void);

#endif
