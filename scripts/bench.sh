#!/usr/bin/env bash
# Builds the daemon and the benchmark programs (release; with the DPDK backend when the system
# DPDK is installed) and runs one scenario with its baselines:
#   ./scripts/bench.sh <udp|memif> [--runs N] [--seconds S] [--sizes 64,1024] [--windows 1,32] [--out FILE]
#   ./scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
bins=(--bin machnetd --bin msg_gen --bin kernel_rpc --bin scenario)
if pkg-config --exists libdpdk 2>/dev/null; then
  cargo build --release --quiet -p machnet-daemon -p machnet-bench --features machnet-daemon/dpdk,machnet-bench/dpdk \
    "${bins[@]}" --bin memif_pingpong
else
  echo "(no system DPDK: building without the dpdk backend; the memif scenario needs it)" >&2
  cargo build --release --quiet -p machnet-daemon -p machnet-bench "${bins[@]}"
fi
exec ./target/release/scenario "$@"
