/*
 * machnet-dpdk-sys shim: DPDK's fast-path functions are `static inline` in its headers, so the
 * shared libraries export no symbol for them. Each function here is a thin, real function
 * around one of them, compiled with exactly the flags `pkg-config --cflags libdpdk` gives.
 */
#include <dlfcn.h>
#include <stddef.h>

#include "shim.h"

int machnet_errno(void) { return rte_errno; }
unsigned machnet_lcore_id(void) { return rte_lcore_id(); }
unsigned machnet_socket_id(void) { return rte_socket_id(); }
uint64_t machnet_rdtsc(void) { return rte_rdtsc(); }
uint64_t machnet_tsc_hz(void) { return rte_get_tsc_hz(); }

uint16_t machnet_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t machnet_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *machnet_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }

int machnet_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned n)
{
	return rte_pktmbuf_alloc_bulk(mp, mbufs, n);
}

void machnet_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
void machnet_pktmbuf_reset(struct rte_mbuf *m) { rte_pktmbuf_reset(m); }
uint8_t *machnet_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }
uint16_t machnet_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }
uint32_t machnet_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }
uint16_t machnet_pktmbuf_headroom(const struct rte_mbuf *m) { return rte_pktmbuf_headroom(m); }
uint16_t machnet_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

uint8_t *machnet_pktmbuf_append(struct rte_mbuf *m, uint16_t len)
{
	return (uint8_t *)rte_pktmbuf_append(m, len);
}

uint64_t machnet_mbuf_ol_flags(const struct rte_mbuf *m) { return m->ol_flags; }
void machnet_mbuf_set_ol_flags(struct rte_mbuf *m, uint64_t flags) { m->ol_flags = flags; }

void machnet_mbuf_set_tx_lens(struct rte_mbuf *m, uint8_t l2_len, uint16_t l3_len)
{
	m->l2_len = l2_len;
	m->l3_len = l3_len;
}

static inline void fill_view(struct rte_mbuf *m, struct machnet_mbuf_view *v)
{
	v->data = rte_pktmbuf_mtod(m, uint8_t *);
	v->data_len = m->data_len;
	v->room = (uint32_t)m->data_len + rte_pktmbuf_tailroom(m);
	v->ol_flags = m->ol_flags;
	v->nb_segs = m->nb_segs;
	v->refcnt = rte_mbuf_refcnt_read(m);
}

struct rte_mbuf *machnet_mbuf_alloc_view(struct rte_mempool *mp, struct machnet_mbuf_view *v)
{
	struct rte_mbuf *m = rte_pktmbuf_alloc(mp);
	if (m != NULL)
		fill_view(m, v);
	return m;
}

void machnet_mbuf_view(struct rte_mbuf *m, struct machnet_mbuf_view *v) { fill_view(m, v); }

void machnet_mbuf_prepare_tx(struct rte_mbuf *m, uint16_t len, uint64_t ol_flags, uint8_t l2_len,
			     uint16_t l3_len)
{
	m->data_len = len;
	m->pkt_len = len;
	m->ol_flags = ol_flags;
	m->l2_len = l2_len;
	m->l3_len = l3_len;
}

typedef void *(*set_print_fn)(void *);

static int silence(const char *lib, const char *sym)
{
	void *h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD);
	if (h == NULL)
		return 0;
	set_print_fn f = (set_print_fn)dlsym(h, sym);
	if (f != NULL)
		f(NULL);
	dlclose(h);
	return f != NULL;
}

int machnet_silence_bpf_logs(void)
{
	return silence("libbpf.so.1", "libbpf_set_print") + silence("libxdp.so.1", "libxdp_set_print");
}
