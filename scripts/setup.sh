#!/usr/bin/env bash
# Installs what the project's commands need and the machine lacks, checking for the thing each
# tool actually loads, and says in one line what it installs and why.
#
#   ./scripts/setup.sh PROFILE...      profiles: demo, test, bench
#   ./scripts/setup.sh --check PROFILE...   only report what is missing (exit 1 if anything is)
#
# demo.sh, test.sh and bench.sh call it first. It needs root and apt-get (Debian 12) to install
# system packages; without them it names what is missing and how to get it. SKIP_INSTALL=1
# reports without installing. Rust itself (stable; nightly for fuzzing and Miri) comes from
# rustup and is not installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=0
profiles=()
for a in "$@"; do
  case "$a" in
    --check) check_only=1 ;;
    demo | test | bench) profiles+=("$a") ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown profile '$a' (demo, test, bench)" >&2; exit 2 ;;
  esac
done
[ ${#profiles[@]} -gt 0 ] || profiles=(test)
want() { local p; for p in "${profiles[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
skip=0
[ "${SKIP_INSTALL:-0}" = 1 ] && check_only=1 skip=1

apt_pkgs=() apt_why=() missing=0
need_apt() { apt_pkgs+=("$1"); apt_why+=("$2"); }

# libclang as bindgen loads it (clang-sys searches for libclang.so, libclang-N.so and their
# versioned names; libclang-cpp.so is a different library and does not count).
have_libclang() {
  local d f
  for d in ${LIBCLANG_PATH:-} /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-[0-9]*.so "$d"/libclang-[0-9]*.so.*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

if want demo || want test || want bench; then
  command -v cc >/dev/null 2>&1 || need_apt gcc "cc builds the C examples and the C API tests"
  command -v python3 >/dev/null 2>&1 || need_apt python3 "the scripts pick free UDP ports with python3"
  command -v taskset >/dev/null 2>&1 || need_apt util-linux "taskset pins daemons and applications to CPUs"
fi
if want test || want bench; then
  command -v pkg-config >/dev/null 2>&1 || need_apt pkg-config "the DPDK bindings find DPDK with pkg-config"
  pkg-config --exists libdpdk 2>/dev/null || { need_apt dpdk "the DPDK backend loads DPDK's poll-mode drivers"; need_apt libdpdk-dev "pkg-config libdpdk: the DPDK headers and libraries the bindings build against"; }
  have_libclang || need_apt libclang-dev "bindgen loads libclang.so to generate the DPDK bindings and the drop-in test's Rust bindings of machnet.h"
fi
if want test; then
  command -v c++ >/dev/null 2>&1 || need_apt g++ "the drop-in test builds a C++ Machnet application"
  [ -e /usr/include/gflags/gflags.h ] || need_apt libgflags-dev "the drop-in test builds a C++ application with gflags, as the original's examples"
  command -v tshark >/dev/null 2>&1 || need_apt tshark "the capture test reads machnetctl capture's pcapng with tshark and tools/wireshark/machnet.lua"
  command -v ip >/dev/null 2>&1 || need_apt iproute2 "ip creates the network namespaces and veth pairs of the DPDK tests"
  # Debian's python (/usr/bin/python3) is the one apt's modules serve; a pyenv python3 earlier on
  # PATH does not see them.
  /usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need_apt python3-prometheus-client "the metrics test parses machnetd's /metrics with prometheus_client's own parser"
fi

if [ ${#apt_pkgs[@]} -gt 0 ]; then
  for i in "${!apt_pkgs[@]}"; do
    if [ $check_only = 1 ]; then
      echo "setup: missing ${apt_pkgs[$i]} (${apt_why[$i]})"
    else
      echo "setup: installing ${apt_pkgs[$i]} (${apt_why[$i]})"
    fi
  done
  if [ $check_only = 1 ]; then
    missing=1
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp /tmp/machnet-setup.XXXXXX)
    if ! { apt-get update -qq && apt-get install -y -qq "${apt_pkgs[@]}"; } >"$log" 2>&1; then
      echo "setup: apt-get install ${apt_pkgs[*]} failed:" >&2
      tail -20 "$log" >&2
      rm -f "$log"
      exit 1
    fi
    rm -f "$log"
  else
    echo "setup: cannot install ${apt_pkgs[*]}: run as root on Debian, or install them yourself" >&2
    exit 1
  fi
fi

# Nightly tools: Miri (the channel's shared-memory rings) and cargo-fuzz. Optional: without a
# nightly toolchain test.sh says it skips them.
if want test && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  comps=$(rustup component list --toolchain nightly --installed 2>/dev/null || true)
  add=()
  grep -q '^miri' <<<"$comps" || add+=(miri)
  grep -q '^rust-src' <<<"$comps" || add+=(rust-src)
  if [ ${#add[@]} -gt 0 ]; then
    if [ $check_only = 1 ]; then
      echo "setup: missing nightly components ${add[*]} (Miri checks the shared-memory rings; rust-src builds the no_std core)"
      missing=1
    else
      echo "setup: installing nightly components ${add[*]} (Miri checks the shared-memory rings; rust-src builds the no_std core)"
      rustup component add --toolchain nightly "${add[@]}" >/dev/null 2>&1 || echo "setup: rustup could not install ${add[*]}" >&2
    fi
  fi
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    if [ $check_only = 1 ]; then
      echo "setup: missing cargo-fuzz (the fuzz smoke run)"
      missing=1
    else
      echo "setup: installing cargo-fuzz (the fuzz smoke run; cargo install, about a minute)"
      cargo install --quiet --locked cargo-fuzz >/dev/null 2>&1 || cargo install --quiet cargo-fuzz >/dev/null 2>&1 ||
        echo "setup: cargo install cargo-fuzz failed" >&2
    fi
  fi
fi
if [ $skip = 1 ] && [ $missing = 1 ]; then
  echo "setup: SKIP_INSTALL=1: continuing without them"
  exit 0
fi
exit $missing
