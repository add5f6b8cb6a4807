#!/usr/bin/env bash
# The project's test command: what CI runs (.ci/run) and what README.md shows.
#
#   ./scripts/test.sh            everything: fmt, clippy, tests, the no_std build, fuzz smoke
#
# Environment:
#   FUZZ_SECONDS=N    seconds per fuzz target (default 15; 0 skips fuzzing)
#   SKIP_INSTALL=1    do not install what is missing (scripts/setup.sh only reports it)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

# --- What the tests need: DPDK and libclang for the dpdk backend, gflags and g++ for the drop-in
# test, Miri and cargo-fuzz on nightly (scripts/setup.sh says what it installs and why) ----------
./scripts/setup.sh test

say "cargo fmt --all --check"
cargo fmt --all --check

say "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
say "cargo clippy -p machnet-net -p machnet-transport --no-default-features -- -D warnings (the no_std core)"
cargo clippy -p machnet-net -p machnet-transport --no-default-features -- -D warnings

say "cargo test"
cargo test --workspace

# --- The no_std core: machnet-net, machnet-transport and the embedding example, built for a
# bare-metal target with core and alloc only (docs/architecture.md, "Without the standard
# library"). Its own target directory keeps the main build's cache intact. --------------------
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  say "no_std build SKIPPED: no nightly toolchain (rustup toolchain install nightly --component rust-src)"
elif ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "no_std build SKIPPED: nightly has no rust-src component (rustup component add rust-src --toolchain nightly)"
else
  say "cargo +nightly build -Z build-std=core,alloc --target x86_64-unknown-none (net, transport, examples/nostd-embed; no std)"
  cargo +nightly build -Z build-std=core,alloc --target x86_64-unknown-none \
    --target-dir "${CARGO_TARGET_DIR:-target}/nostd" \
    -p machnet-net -p machnet-transport -p machnet-nostd-embed --no-default-features
fi

# --- The DPDK backend (needs the system DPDK; the namespace tests need root and iproute2) -------
DPDK_FEATURES=machnet-net/dpdk,machnet-dpdk-sys/bindings,machnet-bench/dpdk,machnet-daemon/dpdk
if pkg-config --exists libdpdk 2>/dev/null; then
  say "cargo clippy with the dpdk feature"
  cargo clippy -p machnet-net -p machnet-dpdk-sys -p machnet-bench -p machnet-daemon --features "$DPDK_FEATURES" --all-targets -- -D warnings
  say "cargo test with the dpdk feature: ports (memif, af_packet, af_xdp, tap), then machnetd on memif and af_packet"
  cargo test -p machnet-net -p machnet-dpdk-sys --features machnet-net/dpdk,machnet-dpdk-sys/bindings
  cargo test -p machnet-daemon --features dpdk --test dpdk --test cli
  say "machnetd with 2 and 3 shards over memif, the sender steering by the receiver's RSS"
  cargo test -p machnet-daemon --features dpdk --test shards memif_
else
  say "DPDK tests FAILED TO RUN: libdpdk not found (install dpdk libdpdk-dev libclang-dev pkg-config)"
  exit 1
fi

# --- Miri on the shared-memory ring and pool code ---------------------------------------------------
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  say "miri SKIPPED: no nightly toolchain"
else
  if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^miri'; then
    say "cargo +nightly miri test (channel ring and pool)"
    cargo +nightly miri test -p machnet-channel --lib -- ring:: pool::
  else
    say "miri SKIPPED: the miri component could not be installed"
  fi
fi

# --- Fuzz smoke ----------------------------------------------------------------------------------
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
if [ "$FUZZ_SECONDS" = 0 ]; then
  say "fuzz smoke SKIPPED: FUZZ_SECONDS=0"
elif ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  say "fuzz smoke SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
else
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    say "fuzz smoke SKIPPED: cargo-fuzz could not be installed"
  else
    ./scripts/fuzz.sh "$FUZZ_SECONDS"
  fi
fi

say "all checks passed"
