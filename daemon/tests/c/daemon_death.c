/*
 * An application in the original's style whose daemon dies under it: it spins on
 * machnet_recv (sleeping 10 us when nothing came) until the call fails, then tries to send.
 * Both must fail with errno ECONNRESET; the program reports what it saw and exits 0.
 */
#include <errno.h>
#include <string.h>
#include <time.h>

#include <machnet.h>

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  if (machnet_init() != 0) return 1;
  void *ch = machnet_attach();
  if (ch == NULL) return 1;
  MachnetFlow_t flow;
  if (machnet_connect(ch, argv[1], argv[2], 888, &flow) != 0) return 1;
  printf("ready\n");
  fflush(stdout);
  char buf[256];
  ssize_t n;
  while ((n = machnet_recv(ch, buf, sizeof(buf), &flow)) == 0) usleep(10);
  double at = now_s();
  int recv_errno = errno;
  int s = machnet_send(ch, flow, "x", 1);
  int send_errno = errno;
  printf("recv %zd errno %d (%s) at %.6f; send %d errno %d; %s\n", n, recv_errno, strerror(recv_errno), at, s,
         send_errno, machnet_last_error());
  fflush(stdout);
  exit(0);
}
