/**
 * hello_world.cc: a Machnet application written as the original Machnet's examples are, built
 * unchanged against machnet-rs by daemon/tests/dropin.rs with the original's own command:
 *
 *   g++ -o hello_world hello_world.cc -I<include dir> -L<lib dir> -lmachnet_shim -lrt -lgflags
 *
 * It includes only machnet.h (plus gflags and two standard C++ headers) and relies on machnet.h
 * for printf, exit, usleep and the C types, as the original's examples do.
 *
 *  - Server: ./hello_world --local=<local IP> [--count=N]     (N: exit after N messages)
 *  - Client: ./hello_world --local=<local IP> --remote=<server IP>
 *
 * The server answers each message with the same text; the client polls for the answer and gives
 * up after --timeout_ms milliseconds of sleeping between polls.
 */

#include <gflags/gflags.h>
#include <machnet.h>

#include <array>
#include <string>

DEFINE_string(local, "", "Local IP address");
DEFINE_string(remote, "", "Remote IP address (client mode)");
DEFINE_uint64(count, 0, "Server: exit after this many messages (0: never)");
DEFINE_uint64(timeout_ms, 10000, "Client: how long to wait for the reply");

static constexpr uint16_t kPort = 31580;

static void check(bool cond, const char *what) {
  if (!cond) {
    printf("%s failed\n", what);
    exit(-1);
  }
}

int main(int argc, char *argv[]) {
  google::ParseCommandLineFlags(&argc, &argv, true);
  setvbuf(stdout, nullptr, _IOLBF, 0);  // the test reads our output through a pipe

  check(machnet_init() == 0, "machnet_init()");
  void *channel = machnet_attach();
  check(channel != nullptr, "machnet_attach()");
  check(machnet_listen(channel, FLAGS_local.c_str(), kPort) == 0, "machnet_listen()");
  printf("Listening on %s:%d\n", FLAGS_local.c_str(), kPort);

  std::array<char, 1024> buf;
  if (FLAGS_remote != "") {
    printf("Sending message to %s:%d\n", FLAGS_remote.c_str(), kPort);
    MachnetFlow flow;
    std::string msg = "Hello World!";
    check(machnet_connect(channel, FLAGS_local.c_str(), FLAGS_remote.c_str(), kPort, &flow) == 0,
          "machnet_connect()");
    check(machnet_send(channel, flow, msg.data(), msg.size()) == 0, "machnet_send()");
    // Wait for the answer, polling as the original's examples do, within the time limit.
    for (uint64_t waited_us = 0; waited_us < FLAGS_timeout_ms * 1000; waited_us += 100) {
      MachnetFlow from;
      const ssize_t ret = machnet_recv(channel, buf.data(), buf.size(), &from);
      check(ret >= 0, "machnet_recv()");
      if (ret == 0) {
        usleep(100);
        continue;
      }
      std::string reply(buf.data(), ret);
      printf("Reply: %s\n", reply.c_str());
      return 0;
    }
    printf("no reply (gave up after at least %llu ms)\n", (unsigned long long)FLAGS_timeout_ms);
    return 1;
  }

  printf("Waiting for message from client\n");
  size_t count = 0;
  while (FLAGS_count == 0 || count < FLAGS_count) {
    MachnetFlow flow;
    const ssize_t ret = machnet_recv(channel, buf.data(), buf.size(), &flow);
    check(ret >= 0, "machnet_recv()");
    if (ret == 0) {
      usleep(10);
      continue;
    }
    std::string msg(buf.data(), ret);
    printf("Received message: %s, count = %zu\n", msg.c_str(), ++count);
    // Answer on the reverse of the flow it came on.
    MachnetFlow back;
    back.src_ip = flow.dst_ip;
    back.dst_ip = flow.src_ip;
    back.src_port = flow.dst_port;
    back.dst_port = flow.src_port;
    check(machnet_send(channel, back, msg.data(), msg.size()) == 0, "machnet_send()");
  }
  return 0;
}
