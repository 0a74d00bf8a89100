#!/usr/bin/env bash
# tools/bench.sh [IMAGE] — end-to-end benchmark of blockvault, side by side with restic,
# on the reference workload (tools/workload/README.md).
#
#   tools/bench.sh                           # image: $BENCH_DIR/disk.raw, built if absent
#   BENCH_DIR=/work/bench tools/bench.sh     # use the image already built there
#   tools/bench.sh /path/to/other.raw
#
# Steps, each timed with tools/peak_rss.sh (wall, user+sys CPU, peak RSS) after a `sync`:
#   1. page cache: `cat IMAGE >/dev/null` twice; the second (hot) read is the ceiling;
#   2. full backup into a fresh vault (fresh keystore), then an unchanged incremental
#      (must store < 1 MiB), then a restore compared byte for byte with the image;
#   3. scatter: a fresh copy of the image, `mutate.sh scatter`, incremental against the full
#      snapshot (hash comparison), restore + cmp; then the same incremental driven by the
#      change list mutate.sh wrote (`--changed`, 4 KiB granular), restore + cmp;
#   4. contig: the same with `mutate.sh contig`;
#   and, if restic is installed, the same steps with restic (repository in the bench dir,
#   password file, default settings) right after blockvault's.
# Prints a table and writes the figures to $BENCH_DIR/results.json.
#
# Env: BENCH_DIR (default: <repo>/bench-out, git-ignored), WORKLOAD_DIR (default:
# <repo>/tools/workload), RESTIC=0 to skip restic, KEEP=1 to keep vaults and copies,
# BV_ARGS extra arguments for `blockvault backup` (e.g. "--zstd-level -1").
# MB/s is disk bytes / wall seconds / 1e6 (as in the workload README). MiB = 2^20 bytes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/tools
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

CMDLINE="$(abspath "$0") $*"
[ -n "${BENCH_DIR:-}" ] && CMDLINE="BENCH_DIR=$BENCH_DIR $CMDLINE"
[ -n "${BV_ARGS:-}" ] && CMDLINE="BV_ARGS='$BV_ARGS' $CMDLINE"
[ -n "${RESTIC:-}" ] && CMDLINE="RESTIC=$RESTIC $CMDLINE"

BENCH_DIR=$(abspath "${BENCH_DIR:-$ROOT/bench-out}")
IMAGE=$(abspath "${1:-$BENCH_DIR/disk.raw}")
WORKLOAD=$(abspath "${WORKLOAD_DIR:-$TOOLS/workload}")
RUN=$BENCH_DIR/work            # scratch: vaults, repository, copies, restores, logs
LOGS=$RUN/logs
TSV=$RUN/figures.tsv
RESULTS=$BENCH_DIR/results.json
PY=$(command -v /usr/bin/python3 || command -v python3)
# shellcheck disable=SC2206
BV_EXTRA=(${BV_ARGS:-})

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

echo "command: $CMDLINE"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min; other work on the machine skews every figure)"

need_pkg() { # need_pkg COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $2"
    apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
  fi
  command -v "$1" >/dev/null || die "missing $1 (apt-get install -y $2)"
}
need_pkg /usr/bin/time time
need_pkg cmp diffutils
[ -n "$PY" ] || die "python3 needed (mutate.sh and the report use it)"

mkdir -p "$BENCH_DIR"
exec 9>"$BENCH_DIR/.bench.lock"
flock -n 9 || die "another bench.sh is running in $BENCH_DIR"

# ---- image ---------------------------------------------------------------------------------
if [ ! -f "$IMAGE" ]; then
  [ -x "$WORKLOAD/make-image.sh" ] || [ -f "$WORKLOAD/make-image.sh" ] \
    || die "no image at $IMAGE and no $WORKLOAD/make-image.sh to build one"
  need_pkg sgdisk gdisk; need_pkg mkfs.ext4 e2fsprogs; need_pkg faketime faketime; need_pkg openssl openssl
  say "building $IMAGE with $WORKLOAD/make-image.sh (about 3 minutes)"
  mkdir -p "$(dirname "$IMAGE")"
  WORKDIR=$(dirname "$IMAGE") OUT=$(basename "$IMAGE") bash "$WORKLOAD/make-image.sh" \
    2>&1 | tee "$BENCH_DIR/make-image.log" >&2
elif [ ! -f "$IMAGE.manifest" ] && [ -z "${1:-}" ]; then
  say "warning: $IMAGE has no $IMAGE.manifest: it may still be being built"
fi
SIZE=$(stat -c %s "$IMAGE")
SHA=$(sed -n 's/^sha256=//p' "$IMAGE.manifest" 2>/dev/null || true)
echo "image:   $IMAGE ($SIZE bytes${SHA:+, sha256 $SHA})"

# ---- build ---------------------------------------------------------------------------------
say "cargo build --release"
(cd "$ROOT" && cargo build --release --bin blockvault -q) || die "release build failed"
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
rm -rf "$RUN"
mkdir -p "$RUN/bin" "$LOGS" "$RUN/restore"
# A private copy: other builds of the tree must not swap the binary under a running bench.
cp "$TARGET_DIR/release/blockvault" "$RUN/bin/blockvault"
BV=$RUN/bin/blockvault
GIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || GIT="$GIT+dirty"
echo "build:   $("$BV" --version) (git $GIT)"

HAVE_RESTIC=0
if [ "${RESTIC:-1}" != 0 ] && command -v restic >/dev/null; then
  HAVE_RESTIC=1
  echo "peer:    $(restic version | head -1)"
else
  echo "peer:    restic not run (${RESTIC:+RESTIC=$RESTIC}$(command -v restic >/dev/null || echo 'not installed'))"
fi
echo

printf 'step\ttool\tkey\tvalue\n' >"$TSV"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$TSV"; }
check() { # check NAME OK(0/1) DETAIL
  record "$1" check "$([ "$2" = 1 ] && echo pass || echo FAIL)" "$3"
  if [ "$2" = 1 ]; then say "check $1: pass ($3)"; else say "check $1: FAIL ($3)"; fi
}

# measure STEP TOOL CMD...: run CMD, stdout to $LOGS/STEP.TOOL.out (or $MEASURE_OUT), stderr
# to .err, and record its wall / CPU / peak RSS.
measure() {
  local step=$1 tool=$2 wall user sys rss
  shift 2
  local log=$LOGS/$step.$tool
  say "$step / $tool: $*"
  # Every step starts with no dirty pages left by an earlier one (restic's buffered restores,
  # image copies): otherwise a step pays for another's writeback.
  sync
  if ! "$TOOLS/peak_rss.sh" -o "$log.time" "$@" >"${MEASURE_OUT:-$log.out}" 2>"$log.err"; then
    tail -n 20 "$log.err" >&2
    die "$step / $tool failed (logs: $log.*)"
  fi
  read -r wall user sys rss _ <"$log.time"
  record "$step" "$tool" wall_s "$wall"
  record "$step" "$tool" user_s "$user"
  record "$step" "$tool" sys_s "$sys"
  record "$step" "$tool" peak_rss_kib "$rss"
}
json_field() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
# The summary line of `restic backup --json`.
restic_summary() {
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
s = None
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if d.get("message_type") == "summary":
        s = d
if s is None:
    sys.exit("no summary in restic output")
print(s.get(sys.argv[2], ""))
EOF
}
same() { # same A B: byte-for-byte comparison, 1 if equal
  if cmp -s "$1" "$2"; then echo 1; else echo 0; fi
}

# ---- blockvault and restic steps -----------------------------------------------------------
VAULT=$RUN/bv/vault
KEYSTORE=$RUN/bv/keystore
BVC=("$BV" --vault "$VAULT" --keystore "$KEYSTORE" --json)
bv_backup() { # bv_backup STEP SOURCE PARENT [BACKUP-ARGS...]
  measure "$1" blockvault "${BVC[@]}" backup "$2" --disk ref --parent "$3" "${@:4}" "${BV_EXTRA[@]}"
  local out=$LOGS/$1.blockvault.out
  record "$1" blockvault bytes_stored "$(json_field "$out" bytes_stored)"
  record "$1" blockvault bytes_read "$(json_field "$out" bytes_read)"
  record "$1" blockvault slots "$(json_field "$out" slots_new)/$(json_field "$out" slots_reused)/$(json_field "$out" slots_zero)"
  record "$1" blockvault reader "$(json_field "$out" reader)"
  record "$1" blockvault repo_bytes "$(du -sb "$VAULT" | cut -f1)"
  json_field "$out" snapshot
}
bv_restore() { # bv_restore STEP SNAPSHOT EXPECTED [RESTORE-ARGS...]
  local t=$RUN/restore/disk.raw step=$1 snap=$2
  shift 2
  rm -f "$t"
  measure "$step" blockvault "${BVC[@]}" restore "ref@$snap" "$t" "${@:2}"
  check "$step.blockvault.cmp" "$(same "$t" "$1")" "restored image vs $(basename "$1")"
  rm -f "$t"
}

export RESTIC_REPOSITORY=$RUN/restic/repo
export RESTIC_PASSWORD_FILE=$RUN/restic/password
export RESTIC_CACHE_DIR=$RUN/restic/cache
COPY=$RUN/disk.raw   # the one path restic backs up: its content is replaced per stage
restic_backup() { # restic_backup STEP [ARGS...]
  local step=$1
  shift
  measure "$step" restic restic backup --json "$@" "$COPY"
  local out=$LOGS/$step.restic.out
  record "$step" restic bytes_stored "$(restic_summary "$out" data_added)"
  record "$step" restic bytes_read "$(restic_summary "$out" total_bytes_processed)"
  record "$step" restic repo_bytes "$(du -sb "$RESTIC_REPOSITORY" | cut -f1)"
  restic_summary "$out" snapshot_id
}
restic_restore() { # restic_restore STEP SNAPSHOT EXPECTED
  local t=$RUN/restore/restic
  rm -rf "$t"
  measure "$1" restic restic restore "$2" --target "$t"
  check "$1.restic.cmp" "$(same "$t$COPY" "$3")" "restored image vs $(basename "$3")"
  rm -rf "$t"
}
fresh_copy() { # fresh_copy [MUTATION]: COPY := IMAGE (then mutated), page-cached
  cp "$IMAGE" "$COPY"
  if [ -n "${1:-}" ]; then
    bash "$WORKLOAD/mutate.sh" "$1" "$COPY" >"$LOGS/mutate-$1.log" 2>&1 || die "mutate.sh $1 failed"
    say "$(cat "$LOGS/mutate-$1.log")"
    # What changed: exact bytes, and the bytes of the 1 MiB slots they touch.
    read -r exact slots < <("$PY" - "$COPY.changes" <<'EOF'
import sys
slot = 1 << 20
exact, touched = 0, set()
for line in open(sys.argv[1]):
    off, ln = map(int, line.split())
    exact += ln
    touched.update(range(off // slot, (off + ln - 1) // slot + 1))
print(exact, len(touched) * slot)
EOF
)
    record "$1" changes bytes_changed "$exact"
    record "$1" changes bytes_in_touched_1MiB_slots "$slots"
  fi
  cat "$COPY" >/dev/null
}

# 1. page cache
MEASURE_OUT=/dev/null measure cache_first cat cat "$IMAGE"
MEASURE_OUT=/dev/null measure cache cat cat "$IMAGE"

# 2. full, unchanged, restore
mkdir -p "$RUN/bv"
# Only `init` (or `backup --init`) creates a vault; not timed with the full backup.
"${BVC[@]}" init >"$LOGS/init.blockvault.out" || die "blockvault init failed"
FULL=$(bv_backup full "$IMAGE" none)
record full blockvault snapshot "$FULL"
INC=$(bv_backup unchanged "$IMAGE" latest)
STORED=$(awk -F'\t' '$1=="unchanged" && $2=="blockvault" && $3=="bytes_stored" {print $4}' "$TSV")
check unchanged.blockvault.stored "$([ "$STORED" -lt 1048576 ] && echo 1 || echo 0)" "$STORED bytes stored, limit 1 MiB"
record unchanged blockvault snapshot "$INC"
bv_restore restore "$FULL" "$IMAGE"
# restic does not fsync what it restores; blockvault does by default. Both ways, if it can.
if "$BV" restore --help 2>/dev/null | grep -q -- --no-sync; then
  bv_restore restore-nosync "$FULL" "$IMAGE" --no-sync
fi

if [ "$HAVE_RESTIC" = 1 ]; then
  mkdir -p "$RUN/restic"
  head -c 24 /dev/urandom | base64 >"$RESTIC_PASSWORD_FILE"
  restic init >"$LOGS/restic-init.log" 2>&1 || { cat "$LOGS/restic-init.log" >&2; die "restic init failed"; }
  record full restic repo_version "$(restic cat config 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["version"])')"
  fresh_copy
  RFULL=$(restic_backup full)
  # --force: re-read the file instead of skipping it on unchanged mtime/size, as blockvault does.
  restic_backup unchanged --force >/dev/null
  restic_restore restore "$RFULL" "$IMAGE"
fi

# 3, 4. scatter and contig: incremental against the full snapshot, restore, cmp
for mode in scatter contig; do
  fresh_copy "$mode"
  SNAP=$(bv_backup "$mode" "$COPY" "$FULL")
  bv_restore "$mode-restore" "$SNAP" "$COPY"
  if [ "$mode" = scatter ]; then
    # mutate.sh's "offset length" lines as a plain JSON change list.
    "$PY" -c 'import json,sys; print(json.dumps([{"offset": int(o), "length": int(l)} for o, l in (x.split() for x in open(sys.argv[1]))]))' \
      "$COPY.changes" >"$RUN/changes.json"
    LSNAP=$(bv_backup scatter-list "$COPY" "$FULL" --changed "$RUN/changes.json")
    LSTORED=$(awk -F'\t' '$1=="scatter-list" && $2=="blockvault" && $3=="bytes_stored" {print $4}' "$TSV")
    LCHANGED=$(awk -F'\t' '$1=="scatter" && $2=="changes" && $3=="bytes_changed" {print $4}' "$TSV")
    check scatter-list.blockvault.stored "$([ "$LSTORED" -le $((2 * LCHANGED)) ] && echo 1 || echo 0)" \
      "$LSTORED bytes stored for $LCHANGED bytes changed, limit 2x"
    bv_restore scatter-list-restore "$LSNAP" "$COPY"
  fi
  if [ "$HAVE_RESTIC" = 1 ]; then
    RSNAP=$(restic_backup "$mode")
    restic_restore "$mode-restore" "$RSNAP" "$COPY"
  fi
done
record total blockvault repo_bytes "$(du -sb "$VAULT" | cut -f1)"
if [ "$HAVE_RESTIC" = 1 ]; then
  record total restic repo_bytes "$(du -sb "$RESTIC_REPOSITORY" | cut -f1)"
fi

if [ "${KEEP:-0}" != 1 ]; then
  rm -rf "$RUN/bv" "$RUN/restic" "$RUN/restore" "$COPY" "$COPY.changes"
fi

# ---- report --------------------------------------------------------------------------------
echo
"$PY" - "$TSV" "$RESULTS" "$CMDLINE" "$IMAGE" "$SIZE" "$SHA" "$GIT" <<'EOF'
import json, os, sys, time
tsv, out, cmdline, image, size, sha, git = sys.argv[1:8]
size = int(size)
rows = [l.rstrip("\n").split("\t") for l in open(tsv)][1:]
fig, checks, changes = {}, [], {}
for step, tool, key, value in rows:
    if tool == "check":
        checks.append({"name": step, "ok": key == "pass", "detail": value})
    elif tool == "changes":
        changes.setdefault(step, {})[key] = int(value)
    else:
        fig.setdefault((step, tool), {})[key] = value

steps = [
    ("cache_first", "read image, first cat"),
    ("cache", "read image, hot cat (ceiling)"),
    ("full", "full backup"),
    ("unchanged", "unchanged incremental"),
    ("restore", "restore full"),
    ("restore-nosync", "restore full, --no-sync"),
    ("scatter", "incremental after scatter"),
    ("scatter-restore", "restore after scatter"),
    ("scatter-list", "scatter, with --changed list"),
    ("scatter-list-restore", "restore after --changed"),
    ("contig", "incremental after contig"),
    ("contig-restore", "restore after contig"),
]
num = lambda v: float(v) if v not in (None, "") else None
results = []
for step, label in steps:
    for tool in ("cat", "blockvault", "restic"):
        f = fig.get((step, tool))
        if not f:
            continue
        wall = num(f["wall_s"]); cpu = num(f["user_s"]) + num(f["sys_s"])
        r = {
            "step": step, "label": label, "tool": tool,
            "wall_s": wall, "user_s": num(f["user_s"]), "sys_s": num(f["sys_s"]),
            "cpu_s": round(cpu, 2),
            "mb_per_s": round(size / wall / 1e6, 1) if wall else None,
            "peak_rss_mib": round(int(f["peak_rss_kib"]) / 1024, 1),
        }
        for k in ("bytes_stored", "bytes_read", "repo_bytes"):
            if f.get(k, "") != "":
                r[k] = int(f[k])
        for k in ("snapshot", "slots", "reader", "repo_version"):
            if k in f:
                r[k] = f[k]
        if step in changes:
            r["changes"] = changes[step]
        results.append(r)

prev = {}
for r in results:  # in step order: what each backup added to the repository on disk
    if "repo_bytes" in r:
        r["repo_growth_bytes"] = r["repo_bytes"] - prev.get(r["tool"], 0)
        prev[r["tool"]] = r["repo_bytes"]
by = {(r["step"], r["tool"]): r for r in results}
ratios = {}
# restic has one restore, without fsync, and one incremental per mutation (no change list).
peer_step = {"restore-nosync": "restore", "scatter-list": "scatter", "scatter-list-restore": "scatter-restore"}
for step, _ in steps:
    b, p = by.get((step, "blockvault")), by.get((peer_step.get(step, step), "restic"))
    if b and p and b["wall_s"]:
        ratios[step] = round(p["wall_s"] / b["wall_s"], 2)

mib = lambda b: f"{b / 2**20:,.1f}" if b is not None else "-"
hdr = (f"{'step':30s} {'tool':10s} {'wall s':>8s} {'MB/s':>8s} {'CPU s':>7s} {'RSS MiB':>8s} "
       f"{'stored MiB':>11s} {'repo +MiB':>10s} {'restic/bv':>9s}")
print(hdr)
print("-" * len(hdr))
last = None
for r in results:
    label = r["label"] if r["step"] != last else ""
    last = r["step"]
    shown_on = "blockvault" if r["step"] in peer_step else "restic"
    ratio = f"{ratios[r['step']]:.2f}x" if r["tool"] == shown_on and r["step"] in ratios else ""
    print(f"{label:30s} {r['tool']:10s} {r['wall_s']:8.2f} {r['mb_per_s']:8.0f} {r['cpu_s']:7.2f} "
          f"{r['peak_rss_mib']:8.1f} {mib(r.get('bytes_stored')):>11s} {mib(r.get('repo_growth_bytes')):>10s} {ratio:>9s}")
print("stored: blockvault bytes_stored (sealed frames); restic data_added (before its "
      "compression). repo +MiB: growth of the repository on disk.")
print("MB/s: image bytes / wall / 1e6. restic/bv: restic wall / blockvault wall.")
print()
for step in ("scatter", "contig"):
    if step in changes:
        c = changes[step]
        print(f"{step}: {mib(c['bytes_changed'])} MiB written by mutate.sh, "
              f"{mib(c['bytes_in_touched_1MiB_slots'])} MiB of 1 MiB slots touched")
for tool in ("blockvault", "restic"):
    f = fig.get(("total", tool))
    if f:
        full = fig.get(("full", tool), {}).get("repo_bytes")
        print(f"{tool}: repository {mib(int(f['repo_bytes']))} MiB after all backups"
              + (f" ({mib(int(full))} MiB after the full one)" if full else ""))
ok = all(c["ok"] for c in checks)
print("checks: " + ", ".join(f"{c['name']} {'pass' if c['ok'] else 'FAIL'}" for c in checks))

doc = {
    "command": cmdline,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "git": git,
    "host": {"cores": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]},
    "image": {"path": image, "size": size, "sha256": sha or None},
    "ceiling_mb_per_s": by.get(("cache", "cat"), {}).get("mb_per_s"),
    "steps": results,
    "ratios_restic_over_blockvault_wall": ratios,
    "checks": checks,
    "ok": ok,
}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
print(f"figures written to {out}")
sys.exit(0 if ok else 1)
EOF
