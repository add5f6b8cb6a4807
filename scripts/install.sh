#!/usr/bin/env bash
# Installs machnet-rs under a prefix, where an application written for the original Machnet
# finds it with the original's names:
#
#   ./scripts/install.sh [PREFIX]                 (default /usr/local)
#   ./scripts/install.sh --uninstall [PREFIX]     removes exactly what install put there
#   ./scripts/install.sh --dpdk [PREFIX]          machnetd with the DPDK backend (needs libdpdk-dev)
#   ./scripts/install.sh --no-build [PREFIX]      installs what target/release already holds
#
#   PREFIX/bin/               machnetd, machnetctl, msg_gen
#   PREFIX/include/           machnet.h, machnet_common.h
#   PREFIX/lib/               libmachnet.so, libmachnet.a, libmachnet_shim.so -> libmachnet.so,
#                             libmachnet_shim.a -> libmachnet.a
#   PREFIX/lib/pkgconfig/     machnet.pc (-lmachnet), machnet_shim.pc (-lmachnet_shim)
#
# Builds the release binaries and library first (cargo decides what is out of date; without
# --dpdk machnetd has the udp backend only), then runs ldconfig when root. --uninstall also
# removes PREFIX/lib/pkgconfig if that leaves it empty.
# Afterwards: cc app.c $(pkg-config --cflags --libs machnet), or, with PREFIX=/usr/local,
# cc app.c -lmachnet_shim -lrt with no -I/-L flags.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=install build=1 dpdk=0 prefix=
for a in "$@"; do
  case "$a" in
    --uninstall) mode=uninstall ;;
    --no-build) build=0 ;;
    --dpdk) dpdk=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option '$a'" >&2; exit 2 ;;
    *)
      [ -z "$prefix" ] || { echo "install.sh: one PREFIX only" >&2; exit 2; }
      prefix=$a
      ;;
  esac
done
prefix=${prefix:-/usr/local}
case "$prefix" in /*) ;; *) prefix=$PWD/$prefix ;; esac
prefix=${prefix%/}
bindir=$prefix/bin incdir=$prefix/include libdir=$prefix/lib pcdir=$prefix/lib/pkgconfig

bins=(machnetd machnetctl msg_gen)
headers=(machnet.h machnet_common.h)
libs=(libmachnet.so libmachnet.a libmachnet_shim.so libmachnet_shim.a)
pcs=(machnet.pc machnet_shim.pc)

refresh_loader() {
  if [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null 2>&1; then
    ldconfig
  else
    echo "install.sh: not root: ldconfig not run" >&2
  fi
}

if [ $mode = uninstall ]; then
  for f in "${bins[@]}"; do rm -f "$bindir/$f"; done
  for f in "${headers[@]}"; do rm -f "$incdir/$f"; done
  for f in "${libs[@]}"; do rm -f "$libdir/$f"; done
  for f in "${pcs[@]}"; do rm -f "$pcdir/$f"; done
  rmdir "$pcdir" 2>/dev/null || true
  refresh_loader
  echo "removed machnet-rs from $prefix"
  exit 0
fi

out=${CARGO_TARGET_DIR:-$PWD/target}/release
if [ $build = 1 ]; then
  features=()
  [ $dpdk = 0 ] || features=(--features dpdk)
  echo "== building (release)"
  cargo build --release --quiet -p machnet-daemon --bin machnetd --bin machnetctl "${features[@]}"
  cargo build --release --quiet -p machnet-bench --bin msg_gen
  cargo build --release --quiet -p machnet-channel --lib
fi
for f in "${bins[@]}" libmachnet.so libmachnet.a; do
  [ -e "$out/$f" ] || { echo "install.sh: $out/$f is missing (run without --no-build)" >&2; exit 1; }
done
# The original's library name (no SONAME: a program records the name it was linked with).
ln -sfn libmachnet.so "$out/libmachnet_shim.so"
ln -sfn libmachnet.a "$out/libmachnet_shim.a"

echo "== installing into $prefix"
install -d "$bindir" "$incdir" "$libdir" "$pcdir"
for f in "${bins[@]}"; do install -m 0755 "$out/$f" "$bindir/$f"; done
for f in "${headers[@]}"; do install -m 0644 "channel/include/$f" "$incdir/$f"; done
install -m 0755 "$out/libmachnet.so" "$libdir/libmachnet.so"
install -m 0644 "$out/libmachnet.a" "$libdir/libmachnet.a"
ln -sfn libmachnet.so "$libdir/libmachnet_shim.so"
ln -sfn libmachnet.a "$libdir/libmachnet_shim.a"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LIBDIR@|$libdir|g" channel/machnet.pc.in | grep -v '^#' >"$pcdir/machnet.pc"
sed -e 's|^Name: machnet$|Name: machnet_shim|' -e 's|-lmachnet$|-lmachnet_shim|' "$pcdir/machnet.pc" >"$pcdir/machnet_shim.pc"
chmod 0644 "$pcdir/machnet.pc" "$pcdir/machnet_shim.pc"
refresh_loader

for f in "${bins[@]}"; do echo "  $bindir/$f"; done
for f in "${headers[@]}"; do echo "  $incdir/$f"; done
for f in "${libs[@]}"; do echo "  $libdir/$f"; done
for f in "${pcs[@]}"; do echo "  $pcdir/$f"; done
if command -v ldconfig >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -qF "=> $libdir/libmachnet.so"; then
  echo "note: $libdir is not in the dynamic loader's path: run programs with LD_LIBRARY_PATH=$libdir," \
    "link them with -Wl,-rpath,$libdir, or add $libdir to /etc/ld.so.conf.d/ and run ldconfig"
fi
case ":$(pkg-config --variable pc_path pkg-config 2>/dev/null):" in
  *":$pcdir:"*) ;;
  *) echo "note: pkg-config finds machnet.pc with PKG_CONFIG_PATH=$pcdir" ;;
esac
