/*
 * hello_world in C against machnet.h and libmachnet.so, as in the original Machnet: both roles
 * listen on <local>:31580; with --remote the program connects to <remote>:31580 and sends
 * "Hello World!"; without it, it waits for messages and prints them. Like the Rust example,
 * the server answers each message with the same text and the client waits for that answer.
 *
 *   cc hello_world.c -I channel/include -L target/release -lmachnet -o hello_world
 *   MACHNET_CTRL_SOCK=... LD_LIBRARY_PATH=target/release ./hello_world --local 198.18.0.1 [--remote 198.18.0.2]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "machnet.h"

#define PORT 31580

static const char *arg(int argc, char **argv, const char *name) {
  for (int i = 1; i + 1 < argc; i++)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return NULL;
}

int main(int argc, char **argv) {
  const char *local = arg(argc, argv, "--local");
  const char *remote = arg(argc, argv, "--remote");
  if (local == NULL) {
    fprintf(stderr, "usage: hello_world --local <ip> [--remote <ip>]\n");
    return 2;
  }
  if (machnet_init() != 0) {
    fprintf(stderr, "hello_world: machnet_init failed (is machnetd running?)\n");
    return 1;
  }
  void *ch = machnet_attach();
  if (ch == NULL) {
    fprintf(stderr, "hello_world: machnet_attach failed\n");
    return 1;
  }
  if (machnet_listen(ch, local, PORT) != 0) {
    fprintf(stderr, "hello_world: machnet_listen failed\n");
    return 1;
  }
  printf("Listening on %s:%d\n", local, PORT);
  fflush(stdout);
  char buf[1024];
  MachnetFlow_t flow;
  if (remote != NULL) {
    if (machnet_connect(ch, local, remote, PORT, &flow) != 0) {
      fprintf(stderr, "hello_world: machnet_connect to %s:%d failed\n", remote, PORT);
      return 1;
    }
    const char *msg = "Hello World!";
    if (machnet_send(ch, flow, msg, strlen(msg)) != 0) {
      fprintf(stderr, "hello_world: machnet_send failed\n");
      return 1;
    }
    ssize_t n = machnet_recv_blocking(ch, buf, sizeof(buf) - 1, &flow, 5 * 1000 * 1000);
    if (n <= 0) {
      fprintf(stderr, "hello_world: no reply within 5 s\n");
      return 1;
    }
    buf[n] = '\0';
    printf("Reply: %s\n", buf);
    machnet_detach(ch);
    return 0;
  }
  printf("Waiting for message from client\n");
  fflush(stdout);
  for (unsigned long count = 1;; count++) {
    ssize_t n;
    while ((n = machnet_recv(ch, buf, sizeof(buf) - 1, &flow)) == 0) usleep(10);
    if (n < 0) continue;
    buf[n] = '\0';
    printf("Received message: %s, count = %lu\n", buf, count);
    fflush(stdout);
    MachnetFlow_t back = {flow.dst_ip, flow.src_ip, flow.dst_port, flow.src_port};
    machnet_send(ch, back, buf, (size_t)n);
  }
}
