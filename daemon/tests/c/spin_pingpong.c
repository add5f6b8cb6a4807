/*
 * A Machnet application in the original's style: it busy-polls machnet_recv in a loop with
 * no sleep, as the original's msg_gen and hello_world do.
 *
 *   spin_pingpong --server <local ip>
 *   spin_pingpong --client <local ip> <remote ip> <round trips>
 *
 * The client sends 64-byte requests one at a time and prints the median and 99th percentile
 * round trip in microseconds and how many completed.
 */
#include <machnet.h>
#include <string.h>
#include <time.h>

#define PORT 31581

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  if (machnet_init() != 0) return 1;
  void *ch = machnet_attach();
  if (ch == NULL) return 1;
  char buf[256];
  MachnetFlow_t flow;
  if (strcmp(argv[1], "--server") == 0) {
    if (machnet_listen(ch, argv[2], PORT) != 0) return 1;
    printf("listening\n");
    fflush(stdout);
    for (;;) {
      ssize_t n = machnet_recv(ch, buf, sizeof(buf), &flow);
      if (n < 0) return 1;
      if (n == 0) continue;
      MachnetFlow_t back = {flow.dst_ip, flow.src_ip, flow.dst_port, flow.src_port};
      while (machnet_send(ch, back, buf, (size_t)n) != 0) {
      }
    }
  }
  if (argc < 5) return 2;
  int rounds = atoi(argv[4]);
  if (machnet_connect(ch, argv[2], argv[3], PORT, &flow) != 0) return 1;
  double *rtt = malloc(sizeof(double) * (size_t)rounds);
  memset(buf, 7, 64);
  int done = 0;
  for (; done < rounds; done++) {
    double t0 = now_us();
    if (machnet_send(ch, flow, buf, 64) != 0) return 1;
    MachnetFlow_t from;
    ssize_t n;
    while ((n = machnet_recv(ch, buf, sizeof(buf), &from)) == 0) {
    }
    if (n != 64) return 1;
    rtt[done] = now_us() - t0;
  }
  qsort(rtt, (size_t)done, sizeof(double), cmp);
  printf("round trips %d p50 %.1f us p99 %.1f us\n", done, rtt[done / 2], rtt[done * 99 / 100]);
  return 0;
}
