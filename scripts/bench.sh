#!/usr/bin/env bash
# Benchmarks, each with its baselines in the same invocation (docs/performance.md):
#
#   ./scripts/bench.sh udp|memif|embedded|bulk|busy|shared [--runs N] [--seconds S] [--sizes 64,1024] [--windows 1,32] [--out FILE]
#   ./scripts/bench.sh transport      # S4: transport per core (transport_bench)
#   ./scripts/bench.sh channel        # S5: channel one way and round trip (channel_bench)
#   ./scripts/bench.sh all            # S1-S5, results in bench/results/, charts in docs/img/
#
# Builds the daemon and the benchmark programs (release), with the DPDK backend when the system
# DPDK is installed (memif, embedded and bulk need it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh bench
bins=(--bin machnetd --bin msg_gen --bin kernel_rpc --bin scenario --bin plot --bin transport_bench)
if pkg-config --exists libdpdk 2>/dev/null; then
  cargo build --release --quiet -p machnet-daemon -p machnet-bench --features machnet-daemon/dpdk,machnet-bench/dpdk \
    "${bins[@]}" --bin memif_pingpong
else
  echo "(no system DPDK: building without the dpdk backend; the memif and embedded scenarios need it)" >&2
  cargo build --release --quiet -p machnet-daemon -p machnet-bench "${bins[@]}"
fi
bin=./target/release
case "${1:-}" in
  transport) shift; exec "$bin/transport_bench" --runs 3 "$@" ;;
  channel) shift; exec cargo bench --quiet -p machnet-channel --bench channel_bench "$@" ;;
  all)
    shift
    mkdir -p bench/results
    for s in embedded memif udp; do
      echo "== scenario $s" >&2
      "$bin/scenario" "$s" --runs 3 --seconds 5 --out "bench/results/$s.json" "$@" | tee "bench/results/$s.md"
    done
    echo "== S4 transport per core" >&2
    "$bin/transport_bench" --runs 3 | tee bench/results/transport.md
    echo "== S5 channel" >&2
    cargo bench --quiet -p machnet-channel --bench channel_bench | tee bench/results/channel.md
    "$bin/plot" --out docs/img bench/results/embedded.json bench/results/memif.json bench/results/udp.json
    ;;
  *) exec "$bin/scenario" "$@" ;;
esac
