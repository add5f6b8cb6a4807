/*
 * machnet_common.h: types and constants shared by the Machnet API (machnet-rs implementation).
 *
 * Source-compatible with the public part of Microsoft Machnet's machnet_common.h: the flow and
 * listener structs, the size limits and the constants applications and language bindings name.
 * machnet.h includes this file; applications need not include it themselves.
 *
 * Not provided: the original's shared-memory structs (its channel context, message buffer and
 * control queue layouts) and the inline helpers that walk them. machnet-rs lays out its channel
 * differently (docs/channel.md), so MachnetChannelCtx_t is opaque here, and a program built
 * against the original's library must be rebuilt against this one. The MACHNET_CHANNEL_*,
 * MACHNET_MSGBUF_* (except MACHNET_MSGBUF_NOTIFY_DELIVERY) and MACHNET_CTRL_* values are the
 * original's, kept so that code naming them compiles; the machnet-rs channel does not use them.
 */
#ifndef MACHNET_COMMON_H_
#define MACHNET_COMMON_H_

/* The standard headers the original's machnet_common.h brings in (directly or through its
 * ring header); applications rely on them without including them. */
#include <assert.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Sizes. Guarded: an application may define these itself. ---------------------------- */
#ifndef KB
#define KB (1 << 10)
#endif
#ifndef MB
#define MB (KB * KB)
#endif
#ifndef CACHE_LINE_SIZE
#define CACHE_LINE_SIZE 64
#endif
#ifndef PAGE_SIZE
#define PAGE_SIZE (4 * 1024)
#endif
#ifndef HUGE_PAGE_2M_SIZE
#define HUGE_PAGE_2M_SIZE (2 * 1024 * 1024)
#endif

/* Largest message: 8 MiB (written out, so that an application's own MB cannot change it). */
#ifndef MACHNET_MSG_MAX_LEN
#define MACHNET_MSG_MAX_LEN (8 * 1024 * 1024)
#endif

/* ---- The original's channel constants (see the note at the top). ------------------------- */
#ifndef MACHNET_CHANNEL_CTX_MAGIC
#define MACHNET_CHANNEL_CTX_MAGIC 0xA5A5A5A5
#endif
#ifndef MACHNET_CHANNEL_VERSION
#define MACHNET_CHANNEL_VERSION 0x01
#endif
#ifndef MACHNET_MSGBUF_MAGIC
#define MACHNET_MSGBUF_MAGIC 0xB6B6B6B6
#endif

/* Message buffer flags. MACHNET_MSGBUF_NOTIFY_DELIVERY is also MachnetMsgHdr_t.flags: request a
 * delivery notification (accepted and propagated; machnet-rs does not act on it). */
#ifndef MACHNET_MSGBUF_FLAGS_SYN
#define MACHNET_MSGBUF_FLAGS_SYN 0x01
#endif
#ifndef MACHNET_MSGBUF_FLAGS_SG
#define MACHNET_MSGBUF_FLAGS_SG 0x02
#endif
#ifndef MACHNET_MSGBUF_FLAGS_FIN
#define MACHNET_MSGBUF_FLAGS_FIN 0x04
#endif
#ifndef MACHNET_MSGBUF_FLAGS_CHAIN
#define MACHNET_MSGBUF_FLAGS_CHAIN 0x08
#endif
#ifndef MACHNET_MSGBUF_NOTIFY_DELIVERY
#define MACHNET_MSGBUF_NOTIFY_DELIVERY 0x80
#endif

/* Control queue opcodes and status codes of the original's channel. */
#ifndef MACHNET_CTRL_OP_CREATE_FLOW
#define MACHNET_CTRL_OP_CREATE_FLOW 0x0001
#endif
#ifndef MACHNET_CTRL_OP_DESTROY_FLOW
#define MACHNET_CTRL_OP_DESTROY_FLOW 0x0002
#endif
#ifndef MACHNET_CTRL_OP_LISTEN
#define MACHNET_CTRL_OP_LISTEN 0x0003
#endif
#ifndef MACHNET_CTRL_OP_STATUS
#define MACHNET_CTRL_OP_STATUS 0x0004
#endif
#ifndef MACHNET_CTRL_STATUS_OK
#define MACHNET_CTRL_STATUS_OK 0x0000
#endif
#ifndef MACHNET_CTRL_STATUS_ERROR
#define MACHNET_CTRL_STATUS_ERROR 0x0001
#endif

/* ---- Types -------------------------------------------------------------------------------- */

/* A connection, as seen by the caller; addresses and ports in host byte order.
 * Sending: src = local, dst = remote. Received: src = remote sender, dst = local. 12 bytes. */
struct MachnetFlow {
  uint32_t src_ip;
  uint32_t dst_ip;
  uint16_t src_port;
  uint16_t dst_port;
};
typedef struct MachnetFlow MachnetFlow_t;

/* A listening address (host byte order). 8 bytes. */
struct MachnetListenerInfo {
  uint32_t ip;
  uint16_t port;
  uint16_t reserved;
};
typedef struct MachnetListenerInfo MachnetListenerInfo_t;

/* An attached channel (opaque: its layout is machnet-rs's own). */
typedef struct MachnetChannelCtx MachnetChannelCtx_t;

#ifdef __cplusplus
}
#endif

#endif /* MACHNET_COMMON_H_ */
