#!/usr/bin/env bash
# tools/bench_serve.sh [IMAGE] — figures for restore and `serve` (README "Figures"), in one run:
#   1. the write ceiling: `dd if=IMAGE of=FILE bs=4M oflag=direct`;
#   2. in turn PAIRS times (default 3): `restore` of IMAGE's snapshot to a file, `restic
#      restore` of the same image (if restic is installed; RESTIC=0 skips it), and
#      `nbdcopy --connections 4` of the served snapshot to a file, each compared byte for byte
#      with IMAGE: medians, restore's CPU time, serve's CPU time per nbdcopy, the ratios within
#      each round; then one restore into a qcow2 image, compared with `qemu-img compare`;
#   3. the serving process's peak RSS (VmHWM) after the nbdcopy and fio runs;
#   4. if fio has its nbd engine: random 4 KiB reads, iodepth 32, RUNTIME s each, against
#      `serve` and against qemu-nbd serving IMAGE as raw and as qcow2;
#   5. time from `serve` start to the first byte read (qemu-io, 4 KiB) on a 1 TiB sparse disk's
#      snapshot, and that process's peak RSS.
# Every step starts after `sync`, with IMAGE, the vault and restic's repository page cache hot.
# IMAGE defaults to $BENCH_DIR/disk.raw (tools/workload/make-image.sh), else a 1 GiB image of
# random and zero MiBs made here. Needs qemu-utils, libnbd-bin, fio (restic optional).
# Env: BENCH_DIR (default <repo>/bench-out), PORT (default 10899), RUNTIME (fio, default 20),
#      PAIRS (rounds of restore, restic and nbdcopy; default 3).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BV=$ROOT/target/release/blockvault
DIR=${BENCH_DIR:-$ROOT/bench-out}/serve
PORT=${PORT:-10899}
RUNTIME=${RUNTIME:-20}
mkdir -p "$DIR"
rm -rf "$DIR/vault" "$DIR/keys" "$DIR/restic" "$DIR/out.raw" "$DIR/out.qcow2" "$DIR/nbd.raw" "$DIR/dd.raw" "$DIR/rr"
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
IMAGE=$(realpath "$IMAGE")
VAULT=(--vault "$DIR/vault" --keystore "$DIR/keys")
bv() { "$BV" "${VAULT[@]}" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
hot() { find "$@" -type f -exec cat {} + >/dev/null; }
# A URL answers NBD requests (a server that is starting: process $2, which must not end).
wait_nbd() {
    until nbdinfo --size "$1" >/dev/null 2>&1; do
        kill -0 "$2" 2>/dev/null || { echo "the server of $1 ended" >&2; exit 1; }
        sleep 0.05
    done
}
size=$(stat -c %s "$IMAGE")
bv init >/dev/null
bv backup "$IMAGE" --disk vm --json >/dev/null
have_restic=0
if [ "${RESTIC:-1}" != 0 ] && command -v restic >/dev/null; then
    have_restic=1
    export RESTIC_REPOSITORY=$DIR/restic/repo RESTIC_PASSWORD_FILE=$DIR/restic/password \
        RESTIC_CACHE_DIR=$DIR/restic/cache
    mkdir -p "$DIR/restic"
    head -c 24 /dev/urandom | base64 >"$RESTIC_PASSWORD_FILE"
    restic init >/dev/null
    (cd "$(dirname "$IMAGE")" && restic backup "$(basename "$IMAGE")" >/dev/null)
fi
hot "$IMAGE" "$DIR/vault" "$DIR/restic" 2>/dev/null || true

sync; t0=$(now)
dd if="$IMAGE" of="$DIR/dd.raw" bs=4M oflag=direct status=none
dd_s=$(since "$t0"); rm -f "$DIR/dd.raw"

# The binary itself in the background (not the bv function's subshell): $pid is the serving
# process, whose VmHWM and CPU time are read and which gets the SIGTERM. Idle while restore
# and restic run.
"$BV" "${VAULT[@]}" serve vm --listen "127.0.0.1:$PORT" 2>"$DIR/serve.err" & pid=$!
qpid=
trap 'kill $pid $qpid 2>/dev/null || true' EXIT
wait_nbd "nbd://127.0.0.1:$PORT" $pid
cpu_of() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

# restore, restic restore and nbdcopy from serve, in turn PAIRS times: this machine's speed
# drifts by tens of per cent between runs, so each ratio is taken within a round, and the
# medians are reported.
restores=(); restics=(); ratios=(); cpus=(); copies=(); copy_pcts=(); serve_cpus=()
TIMEFORMAT='%R %U %S'
for _ in $(seq "${PAIRS:-3}"); do
    sync
    read -r wall user sys < <({ time bv restore vm "$DIR/out.raw" >/dev/null; } 2>&1)
    restores+=("$wall"); cpus+=("$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')")
    cmp "$DIR/out.raw" "$IMAGE"; rm -f "$DIR/out.raw"
    if [ "$have_restic" = 1 ]; then
        sync; t0=$(now)
        restic restore latest --target "$DIR/rr" >/dev/null
        sync # restic writes through the page cache: its bytes on disk count, as restore's do
        restics+=("$(since "$t0")")
        ratios+=("$(awk -v a="${restics[-1]}" -v b="$wall" 'BEGIN { printf "%.1f", a / b }')")
        cmp "$DIR/rr/$(basename "$IMAGE")" "$IMAGE"; rm -rf "$DIR/rr"
    fi
    sync; c0=$(cpu_of $pid); t0=$(now)
    nbdcopy --connections 4 "nbd://127.0.0.1:$PORT" "$DIR/nbd.raw"
    copies+=("$(since "$t0")")
    serve_cpus+=("$(awk -v a="$c0" -v b="$(cpu_of $pid)" 'BEGIN { printf "%.2f", b - a }')")
    copy_pcts+=("$(awk -v a="${copies[-1]}" -v b="$wall" 'BEGIN { printf "%.0f", 100 * b / a }')")
    cmp "$DIR/nbd.raw" "$IMAGE"; rm -f "$DIR/nbd.raw"
done
sync; t0=$(now)
bv restore vm "$DIR/out.qcow2" >/dev/null
qcow2_s=$(since "$t0")
qemu-img compare -q -f qcow2 -F raw "$DIR/out.qcow2" "$IMAGE"; rm -f "$DIR/out.qcow2"
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
restore_s=$(median "${restores[@]}")
restic_s=-
[ "$have_restic" = 1 ] && restic_s=$(median "${restics[@]}")

nbdcopy_s=$(median "${copies[@]}")
fio_bv=-; fio_raw=-; fio_qcow2=-
have_fio=0
if fio --enghelp 2>/dev/null | grep -qw nbd; then
    have_fio=1
    run_fio() { fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
        --time_based --runtime="$RUNTIME" --output-format=json |
        awk -F: '/"iops"/ { gsub(/[ ,]/, "", $2); print int($2); exit }'; }
    fio_bv=$(run_fio "nbd://127.0.0.1:$PORT")
fi
rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
kill -TERM $pid; wait $pid || true
if [ "$have_fio" = 1 ]; then
    qemu-nbd -r -f raw -t -p $((PORT + 1)) "$IMAGE" & qpid=$!
    wait_nbd "nbd://127.0.0.1:$((PORT + 1))" $qpid
    fio_raw=$(run_fio "nbd://127.0.0.1:$((PORT + 1))")
    kill $qpid; wait $qpid || true
    [ -f "$DIR/disk.qcow2" ] || qemu-img convert -f raw -O qcow2 "$IMAGE" "$DIR/disk.qcow2"
    hot "$DIR/disk.qcow2"
    qemu-nbd -r -f qcow2 -t -p $((PORT + 1)) "$DIR/disk.qcow2" & qpid=$!
    wait_nbd "nbd://127.0.0.1:$((PORT + 1))" $qpid
    fio_qcow2=$(run_fio "nbd://127.0.0.1:$((PORT + 1))")
    kill $qpid; wait $qpid || true
    qpid=
fi

# 1 TiB sparse disk: a 4 KiB block of data in the middle.
sparse=$DIR/sparse.raw
rm -f "$sparse"; truncate -s 1T "$sparse"
printf 'first byte' | dd of="$sparse" bs=4096 seek=$((1 << 27)) conv=notrunc status=none
bv backup "$sparse" --disk big >/dev/null
rm -f "$sparse"
t0=$(now)
"$BV" "${VAULT[@]}" serve big --listen "127.0.0.1:$PORT" 2>"$DIR/serve2.err" & pid=$!
until qemu-io -r -f raw -c "read -P 0x66 $((1 << 39)) 1" "nbd://127.0.0.1:$PORT" >/dev/null 2>&1; do
    kill -0 $pid 2>/dev/null || { cat "$DIR/serve2.err" >&2; exit 1; }
    sleep 0.01
done
first_s=$(since "$t0")
rss_big=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
kill -TERM $pid; wait $pid || true
trap - EXIT

printf '%-46s %s\n' "image" "$IMAGE ($size bytes)"
printf '%-46s %s s, %s MB/s\n' "dd bs=4M oflag=direct (write ceiling)" "$dd_s" "$(mbps "$size" "$dd_s")"
printf '%-46s %s s, %s MB/s (runs: %s s; CPU %s s)\n' "restore to a file (median)" "$restore_s" \
    "$(mbps "$size" "$restore_s")" "${restores[*]}" "${cpus[*]}"
if [ "$restic_s" != - ]; then
    printf '%-46s %s s, %s MB/s (runs: %s s)\n' "restic restore + sync (median)" "$restic_s" \
        "$(mbps "$size" "$restic_s")" "${restics[*]}"
    printf '%-46s %sx (median; pairs: %s)\n' "restore against restic, within each pair" \
        "$(median "${ratios[@]}")" "${ratios[*]}"
fi
printf '%-46s %s s, %s MB/s\n' "restore to a qcow2 image" "$qcow2_s" "$(mbps "$size" "$qcow2_s")"
printf '%-46s %s s, %s MB/s (runs: %s s; serve CPU %s s)\n' "nbdcopy --connections 4 from serve (median)" \
    "$nbdcopy_s" "$(mbps "$size" "$nbdcopy_s")" "${copies[*]}" "${serve_cpus[*]}"
printf '%-46s %s %% (median; rounds: %s)\n' "restore's speed reached by nbdcopy, each round" \
    "$(median "${copy_pcts[@]}")" "${copy_pcts[*]}"
printf '%-46s %s KiB\n' "serve peak RSS (after nbdcopy and fio)" "$rss"
printf '%-46s %s / %s / %s\n' "fio randread 4k qd32 IOPS: serve / qemu-nbd raw / qcow2" "$fio_bv" "$fio_raw" "$fio_qcow2"
printf '%-46s %s s (peak RSS %s KiB)\n' "serve start to first byte, 1 TiB sparse" "$first_s" "$rss_big"
