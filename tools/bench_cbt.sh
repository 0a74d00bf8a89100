#!/usr/bin/env bash
# tools/bench_cbt.sh — issue 3's figure: "a 1 TiB sparse qcow2 with 64 MiB written since the
# parent backs up incrementally in under 5 s, with peak RSS under 256 MiB".
#
#   tools/bench_cbt.sh                       # files in $BENCH_DIR (default /work/bench)
#   BENCH_DIR=/data/bench GRANULARITY=4K tools/bench_cbt.sh
#
# Steps (QEMU tools from qemu-utils; GNU time from time):
#   1. a 1 TiB qcow2 (64 KiB clusters); about 1 GiB of random data written over it with
#      qemu-io (64 writes of 16 MiB, one per 16 GiB, each from a fresh random file: `write -P`
#      patterns would compress to nothing);
#   2. `qemu-img bitmap --add --enable -g $GRANULARITY` (default 64K), then the full backup;
#   3. 64 MiB more: 256 writes of 256 KiB of random data at scattered cluster-aligned offsets
#      (fixed seed), in one qemu-io run;
#   4. the incremental with `--bitmap b0`, under `/usr/bin/time -v` (wall, peak RSS), then
#      the same incremental without it (hash comparison of every data slot, against the same
#      parent) for contrast;
#   5. unless VERIFY=0, the bitmap snapshot restored and compared with `qemu-img compare`
#      as it was when backed up (the image is copied aside before the contrast run).
# Prints a table with wall seconds, peak RSS, bytes read and stored, and whether the target
# is met. The work folder ($BENCH_DIR/cbt-PID) is removed at the end unless KEEP=1.
# Env: BENCH_DIR, GRANULARITY (4K or 64K), VERIFY=0, KEEP=1, STRICT=1 (exit 1 if the
# target is missed; other work on the machine skews every figure, so off by default).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/work/bench}
GRANULARITY=${GRANULARITY:-64K}
TARGET_WALL_S=5
TARGET_RSS_MIB=256
TIB=$((1 << 40))
MIB=$((1 << 20))

say() { printf '[bench_cbt] %s\n' "$*" >&2; }
die() { printf '[bench_cbt] error: %s\n' "$*" >&2; exit 1; }
for tool in qemu-img qemu-io /usr/bin/time python3; do
  command -v "$tool" >/dev/null || die "missing $tool (apt-get install -y qemu-utils time python3)"
done
case $GRANULARITY in 4K | 64K) ;; *) die "GRANULARITY must be 4K or 64K" ;; esac

mkdir -p "$BENCH_DIR"
WORK=$(cd "$BENCH_DIR" && pwd)/cbt-$$
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/logs"
IMG=$WORK/disk.qcow2
LOGS=$WORK/logs

echo "date:  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "load:  $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min)"

say "cargo build --release --bin blockvault"
(cd "$ROOT" && cargo build --release --bin blockvault -q) || die "release build failed"
# A private copy: another build of the tree must not swap the binary under a running bench.
cp "$ROOT/target/release/blockvault" "$WORK/blockvault"
BV=("$WORK/blockvault" --vault "$WORK/vault" --keystore "$WORK/keystore")
echo "build: $("$WORK/blockvault" --version) (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"

# ---- 1. the image ----------------------------------------------------------------------------
say "qemu-img create: 1 TiB qcow2, 64 KiB clusters"
qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" 1T
say "writing 64 x 16 MiB of random data, one write per 16 GiB"
for i in $(seq 0 63); do
  head -c $((16 * MIB)) /dev/urandom >"$WORK/pattern"
  qemu-io -f qcow2 -c "write -q -s $WORK/pattern $((i * (TIB / 64) + (i % 7) * MIB)) 16M" "$IMG" \
    >>"$LOGS/qemu-io.log" 2>&1 || die "qemu-io failed (see $LOGS/qemu-io.log)"
done
rm -f "$WORK/pattern"

# ---- 2. bitmap, full backup ------------------------------------------------------------------
qemu-img bitmap --add --enable -g "$GRANULARITY" "$IMG" b0

# measure NAME ARGS...: run `blockvault --json ARGS...` under GNU time -v; its JSON goes to
# $LOGS/NAME.json, the time report to $LOGS/NAME.time.
measure() {
  local name=$1
  shift
  say "$name: blockvault $*"
  /usr/bin/time -v -o "$LOGS/$name.time" "${BV[@]}" --json "$@" >"$LOGS/$name.json" 2>"$LOGS/$name.err" \
    || { tail -n 20 "$LOGS/$name.err" >&2; die "$name failed (logs: $LOGS/$name.*)"; }
}
# Only `init` (or `backup --init`) creates a vault.
"${BV[@]}" init >"$LOGS/init.out" 2>&1 || die "blockvault init failed (see $LOGS/init.out)"
measure full backup "$IMG" --disk big
FULL_ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"])' "$LOGS/full.json")

# ---- 3. 64 MiB more --------------------------------------------------------------------------
say "writing 256 x 256 KiB of random data at scattered offsets"
mkdir -p "$WORK/pieces"
head -c $((64 * MIB)) /dev/urandom | split -b 256K -a 3 - "$WORK/pieces/p"
# Fixed-seed offsets, 64 KiB aligned, one per 4 GiB stretch of the disk: some land in the
# data written above, most in holes.
python3 - "$WORK/pieces" >"$WORK/writes.txt" <<'EOF'
import os, random, sys
rng = random.Random(3)
files = sorted(os.listdir(sys.argv[1]))
stretch = (1 << 40) // 256
for i, f in enumerate(files):
    off = i * stretch + rng.randrange(0, stretch - (256 << 10), 65536)
    print(f"write -q -s {os.path.join(sys.argv[1], f)} {off} 256k")
EOF
args=()
while read -r cmd; do args+=(-c "$cmd"); done <"$WORK/writes.txt"
qemu-io -f qcow2 "${args[@]}" "$IMG" >>"$LOGS/qemu-io.log" 2>&1 || die "qemu-io failed (see $LOGS/qemu-io.log)"
rm -rf "$WORK/pieces"

# ---- 4. the incrementals ---------------------------------------------------------------------
measure bitmap backup "$IMG" --disk big --bitmap b0
BITMAP_ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["short_id"])' "$LOGS/bitmap.json")
[ "${VERIFY:-1}" = 0 ] || cp --sparse=always "$IMG" "$WORK/at-bitmap.qcow2"
measure hash backup "$IMG" --disk big --parent "$FULL_ID"

# ---- 5. restore check ------------------------------------------------------------------------
VERIFIED="not checked (VERIFY=0)"
if [ "${VERIFY:-1}" != 0 ]; then
  say "restoring big@$BITMAP_ID and comparing with qemu-img compare"
  "${BV[@]}" restore "big@$BITMAP_ID" "$WORK/restored.raw" >"$LOGS/restore.out" 2>&1 \
    || die "restore failed (see $LOGS/restore.out)"
  qemu-img compare -f raw -F qcow2 "$WORK/restored.raw" "$WORK/at-bitmap.qcow2" >"$LOGS/compare.out" 2>&1 \
    || die "the restored snapshot differs from the image (see $LOGS/compare.out)"
  [ "$(stat -c %s "$WORK/restored.raw")" = "$TIB" ] || die "the restored image is not 1 TiB"
  VERIFIED="restore of big@$BITMAP_ID equals the image (qemu-img compare)"
fi

# ---- report ----------------------------------------------------------------------------------
echo
python3 - "$LOGS" "$TARGET_WALL_S" "$TARGET_RSS_MIB" "$GRANULARITY" <<'EOF'
import json, re, sys
logs, target_wall, target_rss, granularity = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def timing(name):
    t = open(f"{logs}/{name}.time").read()
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", t)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
    return wall, rss

mib = lambda b: f"{b / (1 << 20):.1f}"
print(f"1 TiB qcow2 (64 KiB clusters), ~1 GiB random data, bitmap b0 at {granularity} granularity,")
print("then 256 x 256 KiB (64 MiB) of random data written since the full backup")
print(f"{'run':<26} {'wall s':>8} {'peak RSS MiB':>13} {'read MiB':>9} {'stored MiB':>11}  change source")
rows = {}
for name, label in [("full", "full backup"), ("bitmap", "incremental --bitmap b0"), ("hash", "incremental, hash compare")]:
    doc = json.load(open(f"{logs}/{name}.json"))
    wall, rss = timing(name)
    rows[name] = (wall, rss)
    print(f"{label:<26} {wall:>8.2f} {rss:>13.1f} {mib(doc['bytes_read']):>9} {mib(doc['bytes_stored']):>11}  {doc['change_source']}")
wall, rss = rows["bitmap"]
met = wall < target_wall and rss < target_rss
print(f"target (bitmap incremental < {target_wall:g} s, < {target_rss:g} MiB): {'met' if met else 'MISSED'}")
open(f"{logs}/target", "w").write("met" if met else "missed")
EOF
echo "check: $VERIFIED"
if [ "${STRICT:-0}" = 1 ] && [ "$(cat "$LOGS/target")" != met ]; then
  exit 1
fi
