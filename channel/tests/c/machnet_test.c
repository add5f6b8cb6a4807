/*
 * C test program for libmachnet, run by tests/capi.rs against the in-process test engine
 * (MACHNET_CTRL_SOCK points at it). Modes:
 *
 *   api                 every function of machnet.h, its return conventions and error cases
 *   roundtrip N BIG     N messages of 1 B..64 KiB (log-uniform) and BIG of up to 8 MiB on an
 *                       echo flow, random gather and scatter lists, every byte checked
 *   limits              (engine with 64-buffer pools, 16-entry rings) a full ring and too-small
 *                       receives leak nothing: afterwards a message needing every buffer works
 *
 * Prints "PASS <mode>" and exits 0, or prints the failed check and exits 1.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "machnet.h"

#define CHECK(c)                                                                                   \
  do {                                                                                             \
    if (!(c)) {                                                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #c,        \
              machnet_last_error());                                                               \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

#define LOCAL "198.18.0.1"
#define REMOTE "198.18.0.2"
#define LOCAL_IP 0xC6120001u
#define REMOTE_IP 0xC6120002u
#define ECHO_PORT 7000
#define HOLD_PORT 9 /* the test engine holds the first message of such a flow */
#define MSS 1418

static uint64_t rng_state = 0x1234567;
static uint64_t rnd(void) {
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static size_t range(size_t lo, size_t hi) { return lo + (size_t)(rnd() % (hi - lo + 1)); }
static size_t log_uniform(size_t max) {
  double u = (double)(rnd() >> 11) / 9007199254740992.0;
  size_t v = (size_t)pow((double)max, u);
  return v < 1 ? 1 : (v > max ? max : v);
}

static void nap(void) {
  struct timespec ts = {0, 20000};
  nanosleep(&ts, NULL);
}

/* Waits for one message with machnet_recv_blocking; checks its size. */
static ssize_t recv_wait(void *ch, void *buf, size_t len, MachnetFlow_t *flow) {
  ssize_t n = machnet_recv_blocking(ch, buf, len, flow, 10 * 1000 * 1000);
  CHECK(n != 0); /* 0 = timed out */
  return n;
}

/* Polls for an event of `kind` for up to ~10 s. */
static MachnetEvent_t wait_event(void *ch, uint32_t kind) {
  MachnetEvent_t ev;
  int i;
  for (i = 0; i < 500000; i++) {
    if (machnet_poll_event(ch, &ev) == 1 && ev.kind == kind) return ev;
    nap();
  }
  CHECK(!"event did not arrive");
  return ev;
}

/* Sends, retrying while the engine has not yet returned enough TX buffers (~10 s at most). */
static void send_retry(void *ch, MachnetFlow_t flow, const void *buf, size_t len) {
  int i;
  for (i = 0; i < 500000; i++) {
    if (machnet_send(ch, flow, buf, len) == 0) return;
    nap();
  }
  CHECK(!"send kept failing");
}

static void *init_and_attach(void) {
  void *ch;
  CHECK(machnet_init() == 0);
  ch = machnet_attach();
  CHECK(ch != NULL);
  return ch;
}

static int mode_api(void) {
  MachnetFlow_t flow, rflow, f2, peer;
  char buf[8192], a[3000], b[3000];
  size_t sz = 123;
  void *ch, *ch2;
  MachnetIovec_t iov[3], riov[2];
  MachnetMsgHdr_t hdr, rhdr, many[4];
  MachnetEvent_t ev;
  int i;

  /* Layouts, as in the original. */
  CHECK(sizeof(MachnetFlow_t) == 12 && offsetof(MachnetFlow_t, src_port) == 8);
  CHECK(sizeof(MachnetIovec_t) == 16 && offsetof(MachnetIovec_t, len) == 8);
  CHECK(sizeof(MachnetMsgHdr_t) == 40 && offsetof(MachnetMsgHdr_t, msg_iov) == 16 &&
        offsetof(MachnetMsgHdr_t, msg_iovlen) == 24 && offsetof(MachnetMsgHdr_t, flags) == 32);
  CHECK(MACHNET_MSG_MAX_LEN == 8388608 && MACHNET_MSGBUF_NOTIFY_DELIVERY == 0x80);

  /* Init: g_ctrl_socket set, idempotent. */
  CHECK(g_ctrl_socket == -1);
  CHECK(machnet_attach() == NULL); /* not initialised yet */
  CHECK(strlen(machnet_last_error()) > 0);
  CHECK(machnet_init() == 0);
  CHECK(g_ctrl_socket >= 0);
  CHECK(machnet_init() == 0);

  /* machnet_bind on a bad fd: NULL and size 0. */
  CHECK(machnet_bind(-1, &sz) == NULL && sz == 0);

  ch = machnet_attach();
  CHECK(ch != NULL);

  /* Listen: -EINVAL for a bad address, -1 for refused ones. */
  CHECK(machnet_listen(ch, "not an address", 1) == -22);
  CHECK(machnet_listen(ch, LOCAL, 888) == 0);
  CHECK(machnet_listen(ch, LOCAL, 888) == -1); /* in use */
  CHECK(machnet_listen(ch, "10.1.2.3", 889) == -1); /* not local */
  CHECK(machnet_listen(NULL, LOCAL, 890) == -1);

  /* Connect. */
  CHECK(machnet_connect(ch, LOCAL, "bogus", ECHO_PORT, &flow) == -1);
  CHECK(machnet_connect(ch, LOCAL, "0.0.0.0", ECHO_PORT, &flow) == -1);
  CHECK(machnet_connect(ch, "10.1.2.3", REMOTE, ECHO_PORT, &flow) == -1);
  CHECK(machnet_connect(ch, LOCAL, REMOTE, ECHO_PORT, &flow) == 0);
  CHECK(flow.src_ip == LOCAL_IP && flow.dst_ip == REMOTE_IP && flow.dst_port == ECHO_PORT && flow.src_port >= 1024);

  /* Send / recv: host byte order flows, src = remote on receive. */
  CHECK(machnet_recv(ch, buf, sizeof buf, &rflow) == 0); /* nothing pending */
  CHECK(machnet_send(ch, flow, "hello", 5) == 0);
  CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == 5 && memcmp(buf, "hello", 5) == 0);
  CHECK(rflow.src_ip == REMOTE_IP && rflow.dst_ip == LOCAL_IP && rflow.src_port == ECHO_PORT &&
        rflow.dst_port == flow.src_port);
  CHECK(machnet_send(ch, flow, buf, 0) == -1);
  CHECK(machnet_send(ch, flow, buf, (size_t)MACHNET_MSG_MAX_LEN + 1) == -1);
  CHECK(machnet_send(ch, flow, NULL, 5) == -1);

  /* sendmsg with a gather list (one empty element), recvmsg with a scatter list. */
  for (i = 0; i < 3000; i++) a[i] = (char)(i * 7);
  iov[0].base = a; iov[0].len = 1000;
  iov[1].base = NULL; iov[1].len = 0;
  iov[2].base = a + 1000; iov[2].len = 2000;
  memset(&hdr, 0, sizeof hdr);
  hdr.msg_size = 3000; hdr.flow_info = flow; hdr.msg_iov = iov; hdr.msg_iovlen = 3;
  hdr.flags = MACHNET_MSGBUF_NOTIFY_DELIVERY;
  CHECK(machnet_sendmsg(ch, &hdr) == 0);
  riov[0].base = b; riov[0].len = 1500;
  riov[1].base = b + 1500; riov[1].len = 1500;
  memset(&rhdr, 0, sizeof rhdr);
  rhdr.msg_iov = riov; rhdr.msg_iovlen = 2;
  CHECK(machnet_recvmsg_blocking(ch, &rhdr, 10 * 1000 * 1000) == 1);
  CHECK(rhdr.msg_size == 3000 && memcmp(a, b, 3000) == 0 && rhdr.flow_info.src_ip == REMOTE_IP);
  CHECK(machnet_recvmsg(ch, &rhdr) == 0);
  CHECK(machnet_recvmsg_blocking(ch, &rhdr, 1000) == 0); /* times out */

  /* msg_size must match the iovecs. */
  hdr.msg_size = 2999;
  CHECK(machnet_sendmsg(ch, &hdr) == -1);
  hdr.msg_size = 3000;

  /* sendmmsg: all four queued, all four echoed. */
  for (i = 0; i < 4; i++) many[i] = hdr;
  CHECK(machnet_sendmmsg(ch, many, 4) == 4);
  for (i = 0; i < 4; i++) CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == 3000);
  many[2].msg_size = 1; /* third is malformed: stops there */
  CHECK(machnet_sendmmsg(ch, many, 4) == 2);
  for (i = 0; i < 2; i++) CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == 3000);

  /* Too small: -1 and the message is gone. */
  CHECK(machnet_send(ch, flow, a, 3000) == 0);
  CHECK(machnet_recv_blocking(ch, buf, 100, &rflow, 10 * 1000 * 1000) == -1);
  CHECK(machnet_recv(ch, buf, sizeof buf, &rflow) == 0);
  CHECK(machnet_send(ch, flow, a, 3000) == 0);
  riov[0].len = 10; riov[1].len = 10;
  for (i = 0; i < 500000; i++) {
    int r = machnet_recvmsg(ch, &rhdr);
    if (r != 0) { CHECK(r == -1); break; }
    nap();
  }
  CHECK(machnet_recv(ch, buf, sizeof buf, &rflow) == 0);

  /* Two channels connected through a listener. */
  ch2 = machnet_attach();
  CHECK(ch2 != NULL);
  CHECK(machnet_listen(ch2, LOCAL, 5555) == 0);
  CHECK(machnet_connect(ch, LOCAL, LOCAL, 5555, &f2) == 0);
  CHECK(machnet_send(ch, f2, "ping", 4) == 0);
  CHECK(recv_wait(ch2, buf, sizeof buf, &peer) == 4 && memcmp(buf, "ping", 4) == 0);
  CHECK(peer.src_port == f2.src_port && peer.dst_port == 5555); /* src = the sender */
  {
    MachnetFlow_t back = {peer.dst_ip, peer.src_ip, peer.dst_port, peer.src_port}; /* swap to reply */
    CHECK(machnet_send(ch2, back, "pong", 4) == 0);
  }
  CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == 4 && memcmp(buf, "pong", 4) == 0);

  /* Close: the peer is told; sending on a closed flow is refused with an event. */
  CHECK(machnet_close(ch, f2) == 0);
  ev = wait_event(ch2, MACHNET_EVENT_FLOW_CLOSED);
  CHECK(ev.flow.dst_port == f2.src_port);
  CHECK(machnet_close(ch, f2) == -1);
  CHECK(machnet_send(ch, f2, "late", 4) == 0); /* queued locally... */
  ev = wait_event(ch, MACHNET_EVENT_TX_REFUSED); /* ...then refused, buffers returned */
  CHECK(ev.flow.src_port == f2.src_port && ev.status != 0);
  CHECK(machnet_poll_event(NULL, &ev) == -1);

  CHECK(machnet_detach(ch2) == 0);
  CHECK(machnet_detach(ch) == 0);
  CHECK(machnet_detach(NULL) == -1);
  printf("PASS api\n");
  return 0;
}

static int mode_roundtrip(long n_small, long n_big) {
  const size_t pat_len = MACHNET_MSG_MAX_LEN + 65536;
  unsigned char *pat = malloc(pat_len), *rbuf = malloc(MACHNET_MSG_MAX_LEN);
  size_t *q_off, *q_len;
  long total = n_small + n_big, sent = 0, got = 0, head = 0, tail = 0, i;
  size_t inflight_bytes = 0, next_off = 0, next_len = 0;
  unsigned long long bytes = 0;
  MachnetFlow_t flow;
  void *ch = init_and_attach();
  CHECK(pat && rbuf);
  q_off = malloc(sizeof(size_t) * 512);
  q_len = malloc(sizeof(size_t) * 512);
  for (i = 0; i < (long)pat_len; i++) pat[i] = (unsigned char)(rnd() >> 56);
  CHECK(machnet_connect(ch, LOCAL, REMOTE, ECHO_PORT, &flow) == 0);
  while (got < total) {
    int progress = 0;
    while (sent < total && tail - head < 256) {
      MachnetIovec_t iov[16];
      MachnetMsgHdr_t h;
      size_t parts, k, at;
      if (next_len == 0) {
        next_len = sent < n_small ? log_uniform(65536)
                                  : (sent == n_small ? (size_t)MACHNET_MSG_MAX_LEN : range(1, MACHNET_MSG_MAX_LEN));
        next_off = range(0, 65536);
      }
      if (inflight_bytes + next_len > 2u * MACHNET_MSG_MAX_LEN && tail > head) break;
      parts = range(1, 16);
      for (k = 0, at = 0; k < parts; k++) {
        size_t l = k + 1 == parts ? next_len - at : range(0, next_len - at);
        iov[k].base = pat + next_off + at;
        iov[k].len = l;
        at += l;
      }
      memset(&h, 0, sizeof h);
      h.msg_size = (uint32_t)next_len; h.flow_info = flow; h.msg_iov = iov; h.msg_iovlen = parts;
      if (machnet_sendmsg(ch, &h) != 0) break; /* ring full or buffers short: receive first */
      q_off[tail % 512] = next_off;
      q_len[tail % 512] = next_len;
      tail++;
      inflight_bytes += next_len;
      sent++;
      next_len = 0;
      progress = 1;
    }
    while (head < tail) {
      size_t len = q_len[head % 512], off = q_off[head % 512], k, at, parts = range(1, 16);
      MachnetIovec_t iov[17];
      MachnetMsgHdr_t h;
      int r;
      for (k = 0, at = 0; k < parts; k++) {
        size_t l = k + 1 == parts ? len - at : range(0, len - at);
        iov[k].base = rbuf + at;
        iov[k].len = l;
        at += l;
      }
      memset(&h, 0, sizeof h);
      h.msg_iov = iov; h.msg_iovlen = parts;
      r = machnet_recvmsg(ch, &h);
      CHECK(r >= 0);
      if (r == 0) break;
      CHECK(h.msg_size == len && h.flow_info.src_ip == REMOTE_IP && h.flow_info.dst_port == flow.src_port);
      CHECK(memcmp(rbuf, pat + off, len) == 0);
      head++;
      inflight_bytes -= len;
      got++;
      bytes += len;
      progress = 1;
    }
    if (!progress) nap();
  }
  CHECK(machnet_detach(ch) == 0);
  printf("PASS roundtrip %ld messages %llu bytes\n", got, bytes);
  free(pat); free(rbuf); free(q_off); free(q_len);
  return 0;
}

/* Engine channel config for this mode: 64 TX and RX buffers, 16-entry rings. */
static int mode_limits(void) {
  static char big[64 * MSS], buf[64 * MSS];
  MachnetFlow_t echo, hold, rflow;
  void *ch = init_and_attach();
  int i, queued = 0, fails = 0;
  memset(big, 0x5A, sizeof big);
  CHECK(machnet_connect(ch, LOCAL, REMOTE, ECHO_PORT, &echo) == 0);
  CHECK(machnet_connect(ch, LOCAL, REMOTE, HOLD_PORT, &hold) == 0);
  /* A held message stalls the channel; queue until the TX ring is full (the engine may take a
   * batch of descriptors off the ring before it stalls, so the count is at least the ring's 16). */
  CHECK(machnet_send(ch, hold, "held", 4) == 0);
  for (i = 0, fails = 0; i < 1000000 && fails < 2000; i++) {
    if (machnet_send(ch, echo, "x", 1) == 0) {
      queued++;
      fails = 0;
    } else {
      fails++;
      nap();
    }
  }
  CHECK(fails == 2000 && queued >= 16 && queued <= 16 + 32);
  /* Full ring: every further send fails; the original leaked the buffers of each. */
  for (i = 0; i < 200; i++) CHECK(machnet_send(ch, echo, big, 3000) == -1);
  /* Release the channel: close the held flow; the queued echoes come back. */
  CHECK(machnet_close(ch, hold) == 0);
  for (i = 0; i < queued; i++) CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == 1);
  /* No TX buffer leaked: a message needing all 64 goes through (once the engine returned them). */
  send_retry(ch, echo, big, sizeof big);
  CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == (ssize_t)sizeof big && memcmp(big, buf, sizeof big) == 0);
  /* Too-small receives return their buffers: 100 of them on a 64-buffer RX pool. */
  for (i = 0; i < 100; i++) {
    send_retry(ch, echo, big, 3000);
    CHECK(machnet_recv_blocking(ch, buf, 100, &rflow, 10 * 1000 * 1000) == -1);
  }
  /* The RX pool is whole: the all-buffer message is received again. */
  send_retry(ch, echo, big, sizeof big);
  CHECK(recv_wait(ch, buf, sizeof buf, &rflow) == (ssize_t)sizeof big);
  CHECK(machnet_detach(ch) == 0);
  printf("PASS limits\n");
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (argc >= 2 && strcmp(argv[1], "api") == 0) return mode_api();
  if (argc >= 4 && strcmp(argv[1], "roundtrip") == 0) return mode_roundtrip(atol(argv[2]), atol(argv[3]));
  if (argc >= 2 && strcmp(argv[1], "limits") == 0) return mode_limits();
  fprintf(stderr, "usage: %s api | roundtrip N BIG | limits\n", argv[0]);
  return 2;
}
