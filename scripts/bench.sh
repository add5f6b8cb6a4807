#!/usr/bin/env bash
# Builds the daemon and the benchmark programs (release) and runs one scenario with its
# baselines: ./scripts/bench.sh <scenario> [scenario flags]; ./scripts/bench.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p machnet-daemon -p machnet-bench --bin machnetd --bin msg_gen --bin kernel_rpc --bin scenario
exec ./target/release/scenario "$@"
