/*
 * machnet.h: the Machnet application API (machnet-rs implementation).
 *
 * Source-compatible with Microsoft Machnet's machnet.h: same function names, argument and
 * return types, struct layouts (host byte order) and return conventions. Additions the
 * original lacks are marked "machnet-rs addition".
 *
 * Link: -lmachnet or -lmachnet_shim (the original's name; the same library), or libmachnet.a
 * plus -lpthread -ldl -lm -lrt -lgcc_s; pkg-config: machnet.
 * The daemon's control socket is $MACHNET_CTRL_SOCK or /var/run/machnet/machnet_ctrl.sock.
 *
 * Threading: calls on one channel must not run concurrently (use one channel per thread);
 * different channels may be used from different threads at once.
 */
#ifndef MACHNET_H_
#define MACHNET_H_

/* As the original's machnet.h: applications (the original's examples among them) call printf,
 * exit and usleep without including these themselves. machnet_common.h brings MachnetFlow_t,
 * MachnetListenerInfo_t, MACHNET_MSG_MAX_LEN, MACHNET_MSGBUF_NOTIFY_DELIVERY and the other
 * shared constants, and <stddef.h>, <stdint.h>, <string.h>, <sys/types.h> among others. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "machnet_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One scatter/gather element. 16 bytes. */
typedef struct MachnetIovec {
  void *base;
  size_t len;
} MachnetIovec_t;

/* A message header for sendmsg/recvmsg. 40 bytes. */
typedef struct MachnetMsgHdr {
  uint32_t msg_size;
  MachnetFlow_t flow_info;
  MachnetIovec_t *msg_iov;
  size_t msg_iovlen;
  uint16_t flags;
} MachnetMsgHdr_t;

/* The registration socket with the daemon; -1 before machnet_init() succeeds. */
extern int g_ctrl_socket;

/* Registers this process with the daemon. Idempotent once it has succeeded.
 * Returns 0 on success, -1 on failure. */
int machnet_init(void);

/* Creates a shared-memory channel with the daemon and maps it. Returns the channel, or NULL. */
void *machnet_attach(void);

/* Maps a channel from a channel memfd obtained elsewhere (takes ownership of shm_fd). Without
 * the daemon's doorbells, machnet_recv_blocking polls with short sleeps. On failure closes
 * shm_fd (if >= 0 and valid), sets *channel_size to 0 and returns NULL; on success sets
 * *channel_size to the mapped size. */
MachnetChannelCtx_t *machnet_bind(int shm_fd, size_t *channel_size);

/* Listens on local_ip:port. Returns 0; -EINVAL (-22) if local_ip does not parse; -1 if the
 * daemon refuses or does not answer in time. */
int machnet_listen(void *channel_ctx, const char *local_ip, uint16_t port);

/* Connects local_ip to remote_ip:remote_port. On success returns 0 and sets *flow to
 * {src_ip = local, src_port = chosen by the daemon, dst_ip = remote, dst_port = remote_port};
 * -1 on failure (including an unparsable or 0.0.0.0 remote address). */
int machnet_connect(void *channel_ctx, const char *local_ip, const char *remote_ip, uint16_t remote_port,
                    MachnetFlow_t *flow);

/* Sends len bytes on flow. Returns 0 once queued (says nothing about delivery); -1 if len is 0
 * or above MACHNET_MSG_MAX_LEN, the transmit ring is full, or buffers are short. Never blocks;
 * a failed send consumes nothing. */
int machnet_send(const void *channel_ctx, MachnetFlow_t flow, const void *buf, size_t len);

/* Sends the gather list of msghdr (msg_size must equal the sum of the iovec lengths; otherwise
 * -1) on msghdr->flow_info. Returns 0 or -1 as machnet_send. */
int machnet_sendmsg(const void *channel_ctx, const MachnetMsgHdr_t *msghdr);

/* Sends vlen messages in order, stopping at the first failure. Returns how many were queued. */
int machnet_sendmmsg(const void *channel_ctx, const MachnetMsgHdr_t *msghdrs, int vlen);

/* Receives one message into buf. Returns its size and sets *flow (src = remote, dst = local);
 * 0 if nothing is pending; -1 if the message is larger than len (the message is discarded). */
ssize_t machnet_recv(const void *channel_ctx, void *buf, size_t len, MachnetFlow_t *flow);

/* Receives one message scattered over msghdr's iovecs (zero-length ones are skipped); sets
 * msg_size and flow_info. Returns 1 if a message was received, 0 if none is pending, -1 if the
 * iovecs are too small (the message is discarded). */
int machnet_recvmsg(const void *channel_ctx, MachnetMsgHdr_t *msghdr);

/* ---- machnet-rs additions ------------------------------------------------------------------ */

/* Event kinds reported by machnet_poll_event(). */
#define MACHNET_EVENT_FLOW_CLOSED 1 /* the peer or the daemon closed the flow */
#define MACHNET_EVENT_FLOW_FAILED 2 /* the flow failed (peer unreachable, reset) */
#define MACHNET_EVENT_TX_REFUSED 3  /* a message was refused (e.g. flow not owned); nothing leaked */
#define MACHNET_EVENT_VIOLATION 4   /* the channel protocol was broken by this process */

/* An unsolicited event. 24 bytes. */
typedef struct MachnetEvent {
  uint32_t kind;   /* MACHNET_EVENT_* */
  uint32_t status; /* reason code (0 = none) */
  MachnetFlow_t flow;
  uint32_t aux;
} MachnetEvent_t;

/* Closes a flow this channel owns. Returns 0 or -1. (machnet-rs addition) */
int machnet_close(void *channel_ctx, MachnetFlow_t flow);

/* Detaches the channel: the daemon destroys it and reclaims its buffers. The pointer is invalid
 * afterwards. Returns 0, or -1 if the daemon could not be told (the channel is unmapped
 * anyway). (machnet-rs addition) */
int machnet_detach(void *channel_ctx);

/* As machnet_recv, waiting up to timeout_us microseconds (< 0: forever) for a message.
 * Returns 0 on timeout. (machnet-rs addition) */
ssize_t machnet_recv_blocking(const void *channel_ctx, void *buf, size_t len, MachnetFlow_t *flow,
                              int64_t timeout_us);

/* As machnet_recvmsg, waiting up to timeout_us microseconds (< 0: forever). Returns 0 on
 * timeout. (machnet-rs addition) */
int machnet_recvmsg_blocking(const void *channel_ctx, MachnetMsgHdr_t *msghdr, int64_t timeout_us);

/* Takes the next unsolicited event. Returns 1 and fills *event, or 0 if there is none.
 * (machnet-rs addition) */
int machnet_poll_event(const void *channel_ctx, MachnetEvent_t *event);

/* A static, human-readable description of the last failure of a machnet_* call on this thread
 * ("ok" if none). Never NULL, never to be freed. (machnet-rs addition) */
const char *machnet_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* MACHNET_H_ */
