#!/usr/bin/env bash
# tools/keybench.sh — key-management figures (issue 4).
#
#   tools/keybench.sh                              # rotation figures only
#   IMAGE=/work/bench/disk.raw tools/keybench.sh   # and the infrastructure layer's cost
#
# 1. Rotation: a vault with a PEM customer key (RSA-3072, made here with openssl) and $DISKS
#    disks of 64 KiB each; `key rotate --new-cmk` to a second PEM key, with the old private
#    key given (unwraps every DEK with the old key, wraps it with the new one). Then a platform
#    vault with as many disks and its `key rotate`. Seconds as each command's --json reports
#    them (the whole command, keys loaded to records written). Target: < 1 s for 100 disks
#    with a PEM key.
# 2. Infrastructure layer (only with IMAGE): full backups of IMAGE into fresh PEM-CMK vaults
#    without and with --infrastructure-encryption, $RUNS of each, alternating, after one read
#    of IMAGE to warm the page cache; the median backup seconds (from --json) of each and
#    their ratio. Target: the layer costs < 25 % of full-backup throughput. Skipped, saying
#    so, when the 1-minute load average is still above MAX_LOAD after waiting up to
#    QUIET_WAIT seconds for it to drop, or another benchmark holds $(dirname IMAGE)/.bench.lock
#    (the lock tools/bench.sh takes).
#
# Env: BV (the binary; default target/release/blockvault, built with cargo), WORK (scratch
# folder; default a new temp folder, removed at the end unless KEEP=1; a given one is kept), DISKS (100), RUNS (3),
# IMAGE (unset: skip step 2), MAX_LOAD (default: the number of cores), QUIET_WAIT (300).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISKS=${DISKS:-100}
RUNS=${RUNS:-3}
MAX_LOAD=${MAX_LOAD:-$(nproc)}
QUIET_WAIT=${QUIET_WAIT:-300}

say() { printf '[keybench] %s\n' "$*" >&2; }
die() { printf '[keybench] error: %s\n' "$*" >&2; exit 1; }
command -v openssl >/dev/null || die "openssl needed (apt-get install openssl)"
command -v python3 >/dev/null || die "python3 needed (JSON figures)"

if [ -z "${BV:-}" ]; then
  say "building the release binary"
  (cd "$ROOT" && cargo build --release --bin blockvault -q)
  BV=$ROOT/target/release/blockvault
fi
[ -x "$BV" ] || die "no binary at $BV"

if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d -t keybench.XXXXXX)
  [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cd "$WORK"

# field FILE NAME: a top-level field of a JSON document.
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
# median X...: the median of the numbers given.
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

echo "binary:  $BV"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- 1. rotation ------------------------------------------------------------------------------
for k in a b; do
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out $k.key 2>/dev/null
  openssl pkey -in $k.key -pubout -out $k.pub
done
head -c 65536 /dev/urandom >disk.img

# fill VAULT KEYOPTS...: $DISKS disks into the vault (each a 64 KiB image backed up once).
fill() {
  local vault=$1; shift
  for i in $(seq 1 "$DISKS"); do
    head -c 8 /dev/urandom | dd of=disk.img conv=notrunc status=none
    "$BV" --vault "$WORK/$vault" --keystore ks "$@" backup disk.img --disk "disk-$i" --json >/dev/null
  done
}

say "PEM customer-key vault with $DISKS disks"
"$BV" --vault "$WORK/cmk" --keystore ks init --cmk rsa:a.pub --json >/dev/null
fill cmk --cmk-private a.key
"$BV" --vault "$WORK/cmk" --keystore ks --cmk-private a.key key rotate --new-cmk rsa:b.pub --json >rot-cmk.json
n=$(field rot-cmk.json records_rewrapped)
[ "$n" = "$DISKS" ] || die "rotation re-wrapped $n records, expected $DISKS"
"$BV" --vault "$WORK/cmk" --keystore ks --cmk-private b.key verify --json >/dev/null \
  || die "the rotated vault does not verify with the new private key"
cmk_s=$(field rot-cmk.json seconds)

say "platform vault with $DISKS disks"
"$BV" --vault "$WORK/plat" --keystore ks init --json >/dev/null
fill plat
"$BV" --vault "$WORK/plat" --keystore ks key rotate --json >rot-plat.json
plat_s=$(field rot-plat.json seconds)

printf '\n%-52s %10s\n' "rotation ($DISKS disks, one DEK generation each)" "seconds"
printf '%-52s %10.3f\n' "key rotate --new-cmk (PEM RSA-3072 -> RSA-3072)" "$cmk_s"
printf '%-52s %10.3f\n' "key rotate (platform KEK)" "$plat_s"
python3 -c 'import sys; s=float(sys.argv[1]); print("PEM rotation target < 1 s:", "met" if s < 1 else "NOT met")' "$cmk_s"

# ---- 2. infrastructure layer -----------------------------------------------------------------
[ -n "${IMAGE:-}" ] || { echo; echo "infrastructure layer: not measured (set IMAGE)"; exit 0; }
[ -f "$IMAGE" ] || die "no image at $IMAGE"
exec 9>"$(dirname "$IMAGE")/.bench.lock"
if ! flock -n 9; then
  echo; echo "infrastructure layer: not measured: another benchmark holds $(dirname "$IMAGE")/.bench.lock"
  exit 0
fi
cat "$IMAGE" >/dev/null
busy() { python3 -c 'import sys; sys.exit(float(sys.argv[1]) <= float(sys.argv[2]))' "$(load1)" "$MAX_LOAD"; }
waited=0
while busy && [ "$waited" -lt "$QUIET_WAIT" ]; do
  sleep 10; waited=$((waited + 10))
done
if busy; then
  echo; echo "infrastructure layer: not measured: load average $(load1) > $MAX_LOAD after ${waited} s (machine too busy)"
  exit 0
fi
size=$(stat -c %s "$IMAGE")
plain=(); infra=()
for r in $(seq 1 "$RUNS"); do
  for mode in plain infra; do
    rm -rf "v-$mode"
    extra=(); [ $mode = infra ] && extra=(--infrastructure-encryption)
    "$BV" --vault "$WORK/v-$mode" --keystore ks init --cmk rsa:a.pub "${extra[@]}" --json >/dev/null
    "$BV" --vault "$WORK/v-$mode" --keystore ks --cmk-private a.key backup "$IMAGE" --disk img --json >"b-$mode-$r.json"
    s=$(field "b-$mode-$r.json" seconds)
    say "run $r $mode: $s s (load $(load1))"
    if [ $mode = plain ]; then plain+=("$s"); else infra+=("$s"); fi
    rm -rf "v-$mode"
  done
done
mp=$(median "${plain[@]}"); mi=$(median "${infra[@]}")
printf '\n%-52s %10s %10s\n' "full backup of $(basename "$IMAGE") ($((size >> 20)) MiB), $RUNS runs" "median s" "MB/s"
printf '%-52s %10.2f %10.1f\n' "PEM CMK vault" "$mp" "$(python3 -c "print($size/$mp/1e6)")"
printf '%-52s %10.2f %10.1f\n' "PEM CMK vault + --infrastructure-encryption" "$mi" "$(python3 -c "print($size/$mi/1e6)")"
python3 -c 'import sys; p,i=map(float,sys.argv[1:]); c=1-p/i; print(f"throughput cost of the layer: {c*100:.1f} % (ratio {i/p:.3f}); target < 25 %:", "met" if c < 0.25 else "NOT met")' "$mp" "$mi"
echo "runs plain: ${plain[*]}; infra: ${infra[*]}; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
