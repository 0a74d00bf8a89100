#!/usr/bin/env bash
# tools/bench_serve.sh [IMAGE] — figures for `serve` (README "Figures"):
#   1. restore of IMAGE's snapshot to a file vs `nbdcopy --connections 4` of the served
#      snapshot to a file (both page cache hot, compared byte for byte with IMAGE);
#   2. time from `serve` start to the first byte read (qemu-io, 4 KiB) on a 1 TiB sparse disk's
#      snapshot, and the serving process's peak RSS (VmHWM) after nbdcopy;
#   3. if fio has its nbd engine: random 4 KiB reads, iodepth 32, 30 s, against `serve` and
#      against qemu-nbd serving IMAGE as raw.
# IMAGE defaults to $BENCH_DIR/disk.raw (tools/workload/make-image.sh), else a 1 GiB image of
# random and zero MiBs made here. Needs qemu-utils, libnbd-bin, fio.
# Env: BENCH_DIR (default <repo>/bench-out), PORT (default 10899).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BV=$ROOT/target/release/blockvault
DIR=${BENCH_DIR:-$ROOT/bench-out}/serve
PORT=${PORT:-10899}
mkdir -p "$DIR"
rm -rf "$DIR/vault" "$DIR/keys" "$DIR/out.raw" "$DIR/nbd.raw"
IMAGE=${1:-${BENCH_DIR:-$ROOT/bench-out}/disk.raw}
if [ ! -f "$IMAGE" ]; then
    IMAGE=$DIR/gen.raw
    if [ ! -f "$IMAGE" ]; then
        truncate -s 1G "$IMAGE"
        for i in $(seq 0 3 1023); do
            head -c 1M /dev/urandom | dd of="$IMAGE" bs=1M seek="$i" conv=notrunc status=none
        done
    fi
fi
bv() { "$BV" --vault "$DIR/vault" --keystore "$DIR/keys" "$@"; }
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
size=$(stat -c %s "$IMAGE")
bv init >/dev/null
bv backup "$IMAGE" --disk vm --json >/dev/null
cat "$IMAGE" >/dev/null

t0=$(now); bv restore vm "$DIR/out.raw" >/dev/null; t1=$(now)
cmp "$DIR/out.raw" "$IMAGE"
restore_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

bv serve vm --listen "127.0.0.1:$PORT" 2>"$DIR/serve.err" & pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until grep -q serving "$DIR/serve.err"; do sleep 0.05; done
t0=$(now); nbdcopy --connections 4 "nbd://127.0.0.1:$PORT" "$DIR/nbd.raw"; t1=$(now)
cmp "$DIR/nbd.raw" "$IMAGE"
nbdcopy_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
fio_bv=-; fio_qemu=-
if fio --enghelp 2>/dev/null | grep -qw nbd; then
    run_fio() { fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
        --time_based --runtime=30 --output-format=json | awk -F: '/"iops"/ { gsub(/[ ,]/, "", $2); print int($2); exit }'; }
    fio_bv=$(run_fio "nbd://127.0.0.1:$PORT")
fi
kill -TERM $pid; wait $pid || true
if [ "$fio_bv" != - ]; then
    qemu-nbd -r -f raw -t -p $((PORT + 1)) "$IMAGE" & qpid=$!
    sleep 1
    fio_qemu=$(run_fio "nbd://127.0.0.1:$((PORT + 1))")
    kill $qpid; wait $qpid || true
fi

# 1 TiB sparse disk: a 4 KiB block of data in the middle.
sparse=$DIR/sparse.raw
rm -f "$sparse"; truncate -s 1T "$sparse"
printf 'first byte' | dd of="$sparse" bs=4096 seek=$((1 << 27)) conv=notrunc status=none
bv backup "$sparse" --disk big >/dev/null
t0=$(now)
bv serve big --listen "127.0.0.1:$PORT" 2>"$DIR/serve2.err" & pid=$!
until qemu-io -r -f raw -c "read -P 0x66 $((1 << 39)) 1" "nbd://127.0.0.1:$PORT" >/dev/null 2>&1; do sleep 0.01; done
t1=$(now)
first_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
rss_big=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
kill -TERM $pid; wait $pid || true
trap - EXIT

printf '%-44s %s\n' "image" "$IMAGE ($size bytes)"
printf '%-44s %s s, %s MB/s\n' "restore to a file" "$restore_s" "$(mbps "$size" "$restore_s")"
printf '%-44s %s s, %s MB/s\n' "nbdcopy --connections 4 from serve" "$nbdcopy_s" "$(mbps "$size" "$nbdcopy_s")"
printf '%-44s %s KiB\n' "serve peak RSS (after nbdcopy)" "$rss"
printf '%-44s %s s (peak RSS %s KiB)\n' "serve start to first byte, 1 TiB sparse" "$first_s" "$rss_big"
printf '%-44s %s / %s\n' "fio randread 4k qd32 IOPS: serve / qemu-nbd" "$fio_bv" "$fio_qemu"
