#!/usr/bin/env bash
# The quick start: build, start two machnetd on this machine joined by the zero-setup UDP
# backend (a loopback tunnel; Machnet addresses 198.18.0.1 and 198.18.0.2), run hello_world
# (the C client, linked with -lmachnet_shim as the original's applications are, against the Rust
# server) and a short request/response benchmark (msg_gen), print rate and latency percentiles,
# and stop everything.
#
#   ./scripts/demo.sh [SECONDS_PER_BENCHMARK]      (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}

./scripts/setup.sh demo
echo "== building (release)"
cargo build --release --quiet -p machnet-daemon -p machnet-channel -p machnet-bench --bin machnetd --bin msg_gen --example hello_world
cargo build --release --quiet -p machnet-channel --lib
bin=$PWD/target/release
# The original's name for the library, which its Makefiles, CMake files and bindings link or
# load: the same library under a second name (no SONAME: a program records the name it linked).
ln -sfn libmachnet.so "$bin/libmachnet_shim.so"
ln -sfn libmachnet.a "$bin/libmachnet_shim.a"
work=$(mktemp -d /tmp/machnet-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cc -O2 -Wall -o "$work/hello_world_c" channel/examples/hello_world.c -Ichannel/include -L"$bin" -lmachnet_shim -lrt

read -r pa pb < <(python3 -c 'import socket
s=[socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
# With two or more cores: daemon a and its applications on CPU 0, b and its applications on
# CPU 1 (unpinned, the scheduler moves busy processes onto each other's core and the tail
# grows to milliseconds). With one core, nothing is pinned.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
  mask_a='"cpu_mask": "0x1", ' mask_b='"cpu_mask": "0x2", ' on_a="taskset -c 0" on_b="taskset -c 1"
else
  mask_a='' mask_b='' on_a='' on_b=''
fi
for side in a b; do
  if [ $side = a ]; then mac=02:00:00:00:00:01 ip=198.18.0.1 me=$pa peer=$pb mask=$mask_a; else mac=02:00:00:00:00:02 ip=198.18.0.2 me=$pb peer=$pa mask=$mask_b; fi
  cat > "$work/$side.json" <<JSON
{"machnet_config": {"$mac": {${mask}"ip": "$ip"}},
 "machnet_rs": {"backend": "udp", "idle": "adaptive", "udp": {"bind": "127.0.0.1:$me", "peers": ["127.0.0.1:$peer"]}}}
JSON
  "$bin/machnetd" --config "$work/$side.json" --ctrl-sock "$work/$side.sock" --log-level warn 2> "$work/$side.log" &
  pids+=($!)
done
for side in a b; do
  for _ in $(seq 200); do [ -S "$work/$side.sock" ] && break; sleep 0.05; done
  [ -S "$work/$side.sock" ] || { echo "machnetd $side did not start:"; cat "$work/$side.log"; exit 1; }
done
echo "== two machnetd running: 198.18.0.1 <-> 198.18.0.2 over UDP 127.0.0.1:$pa <-> 127.0.0.1:$pb"

echo "== hello_world (Rust server on 198.18.0.2, C client on 198.18.0.1)"
MACHNET_CTRL_SOCK="$work/b.sock" "$bin/examples/hello_world" --local 198.18.0.2 > "$work/hello_server.out" 2>&1 &
pids+=($!)
sleep 0.3
MACHNET_CTRL_SOCK="$work/a.sock" LD_LIBRARY_PATH="$bin" "$work/hello_world_c" --local 198.18.0.1 --remote 198.18.0.2
sed 's/^/  server: /' "$work/hello_server.out"

echo "== msg_gen request/response, ${secs}s each (apps sleep on the doorbell: this machine may have few cores)"
MACHNET_CTRL_SOCK="$work/b.sock" $on_b "$bin/msg_gen" --local_ip 198.18.0.2 --blocking --msg_size 1024 > "$work/msg_server.out" 2>&1 &
pids+=($!)
sleep 0.3
for w in 1 32; do
  echo "-- window $w, 1 KiB messages"
  MACHNET_CTRL_SOCK="$work/a.sock" $on_a "$bin/msg_gen" --local_ip 198.18.0.1 --remote_ip 198.18.0.2 \
    --msg_size 1024 --msg_window $w --duration "$secs" --blocking 2>/dev/null
done
echo "== stopping"
