/*
 * hello_world.c: a Machnet application in C written as the original Machnet's examples are,
 * built unchanged against machnet-rs by daemon/tests/dropin.rs with the original's flags:
 *
 *   cc -o hello_world hello_world.c -I<include dir> -L<lib dir> -lmachnet_shim -lrt
 *
 * It includes only machnet.h and relies on it for printf, exit, usleep, strcmp, strtoul and
 * the C types, as the original's header provides them.
 *
 *  - Server: ./hello_world --local <local IP> [--count N]     (N: exit after N messages)
 *  - Client: ./hello_world --local <local IP> --remote <server IP>
 *
 * The server answers each message with the same text; the client polls for the answer and gives
 * up after 10 s of sleeping between polls.
 */
#include <machnet.h>

#define PORT 31580
#define TIMEOUT_US (10 * 1000 * 1000)

static void check(int cond, const char *what) {
  if (!cond) {
    printf("%s failed\n", what);
    exit(-1);
  }
}

int main(int argc, char **argv) {
  const char *local = NULL, *remote = NULL;
  unsigned long max_count = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--local") == 0) {
      local = argv[i + 1];
    } else if (strcmp(argv[i], "--remote") == 0) {
      remote = argv[i + 1];
    } else if (strcmp(argv[i], "--count") == 0) {
      max_count = strtoul(argv[i + 1], NULL, 10);
    } else {
      printf("unknown flag %s\n", argv[i]);
      exit(2);
    }
  }
  check(local != NULL, "--local");
  setvbuf(stdout, NULL, _IOLBF, 0); /* the test reads our output through a pipe */

  check(machnet_init() == 0, "machnet_init()");
  void *channel = machnet_attach();
  check(channel != NULL, "machnet_attach()");
  check(machnet_listen(channel, local, PORT) == 0, "machnet_listen()");
  printf("Listening on %s:%d\n", local, PORT);

  char buf[1024];
  if (remote != NULL) {
    const char *msg = "Hello World!";
    MachnetFlow_t flow;
    printf("Sending message to %s:%d\n", remote, PORT);
    check(machnet_connect(channel, local, remote, PORT, &flow) == 0, "machnet_connect()");
    check(machnet_send(channel, flow, msg, strlen(msg)) == 0, "machnet_send()");
    for (long waited_us = 0; waited_us < TIMEOUT_US; waited_us += 100) {
      struct MachnetFlow from;
      ssize_t ret = machnet_recv(channel, buf, sizeof(buf) - 1, &from);
      check(ret >= 0, "machnet_recv()");
      if (ret == 0) {
        usleep(100);
        continue;
      }
      buf[ret] = '\0';
      printf("Reply: %s\n", buf);
      return 0;
    }
    printf("no reply (gave up after at least %d ms)\n", TIMEOUT_US / 1000);
    return 1;
  }

  printf("Waiting for message from client\n");
  unsigned long count = 0;
  while (max_count == 0 || count < max_count) {
    MachnetFlow_t flow;
    ssize_t ret = machnet_recv(channel, buf, sizeof(buf) - 1, &flow);
    check(ret >= 0, "machnet_recv()");
    if (ret == 0) {
      usleep(10);
      continue;
    }
    buf[ret] = '\0';
    printf("Received message: %s, count = %lu\n", buf, ++count);
    MachnetFlow_t back = {flow.dst_ip, flow.src_ip, flow.dst_port, flow.src_port};
    check(machnet_send(channel, back, buf, (size_t)ret) == 0, "machnet_send()");
  }
  return 0;
}
