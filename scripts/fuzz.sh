#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds (default 60), seeded with the golden frames.
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# Seeds: every golden frame, with a selector byte in front (the targets' first input byte).
mkdir -p seeds
python3 - <<'PY'
import glob, os
for p in glob.glob('../net/tests/golden/*.hex'):
    data = bytes.fromhex(open(p).read().replace('\n', ''))
    for sel in (0x00, 0x01, 0x80, 0x81):
        open('seeds/%s_%02x' % (os.path.basename(p)[:-4], sel), 'wb').write(bytes([sel]) + data)
PY
for t in "${targets[@]}"; do
  printf '\n== fuzz %s for %ss\n' "$t" "$secs"
  mkdir -p "corpus/$t"
  cargo +nightly fuzz run "$t" "corpus/$t" seeds -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E 'Done|stat::number_of_executed_units|ERROR|panicked|SUMMARY' || true
  # cargo fuzz exits non-zero on a finding; re-check the status explicitly.
  if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz target $t produced a crash artifact in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
