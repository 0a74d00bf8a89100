#!/usr/bin/env bash
# Build blockvault's cargo-fuzz targets (fuzz/) and run each for a while.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET]        default 20
#
# Exits non-zero if a target fails to build, or if any run ends in a crash: a panic (failed
# assertion included), a hang (one input over FUZZ_TIMEOUT seconds) or an out-of-memory
# (RSS over FUZZ_RSS_MB). Crashing inputs are kept in fuzz/artifacts/<target>/ and printed
# here in hex; reproduce one with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
#
# Environment:
#   FUZZ_TARGETS    space-separated subset of targets (default: all of them, in fuzz/Cargo.toml)
#   FUZZ_SANITIZER  none (default) or address
#   FUZZ_TIMEOUT    seconds one input may take (default 10)
#   FUZZ_RSS_MB     memory limit of a run in MiB (default 2048)
#   FUZZ_STRICT     set: also assert canonical encodings (decode→encode gives the same bytes)
#
# How cargo-fuzz runs on this machine (stable Rust only; no nightly can be fetched):
#   * `cargo fuzz build -s none` works on plain stable. Without a sanitizer cargo-fuzz passes
#     only stable flags: -Cpasses=sancov-module and -Cllvm-args=-sanitizer-coverage-* (the
#     coverage libFuzzer needs), --cfg fuzzing, -Cdebug-assertions (so overflow checks too),
#     -Ccodegen-units=1. libFuzzer itself is C++ compiled by libfuzzer-sys's build script.
#     This is the default here: Rust code is memory-safe, so ASan adds little to these targets.
#   * `-s address` (cargo-fuzz's own default) adds -Zsanitizer=address, which stable refuses
#     ("the option `Z` is only accepted on the nightly compiler") unless RUSTC_BOOTSTRAP=1 is
#     set; this script sets it only for FUZZ_SANITIZER=address (the ASan runtime ships with the
#     stable rust-std). With ASan, libFuzzer's -malloc_limit_mb also works (no malloc hooks
#     without a sanitizer: then only the RSS limit catches an unbounded allocation).
#   * The targets need no nightly feature themselves. Build time dominates short runs: the
#     first build compiles blockvault and all its dependencies instrumented (several minutes on
#     2 cores); later builds reuse fuzz/target/.
set -euo pipefail

secs=${1:-20}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;; esac
sanitizer=${FUZZ_SANITIZER:-none}
timeout_s=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
echo "== $(cargo fuzz --version), $(rustc --version)"

if [ "$sanitizer" != none ]; then
    # Lets the stable compiler accept -Zsanitizer (see the top of this file).
    export RUSTC_BOOTSTRAP=1
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi

t0=$(date +%s)
echo "== building ${#targets[@]} targets (sanitizer: $sanitizer)"
cargo fuzz build -s "$sanitizer"
build_s=$(( $(date +%s) - t0 ))
echo "== build took ${build_s}s"

# The keystore target writes key files; keep them in a folder of ours, in memory if we can.
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$shm/blockvault-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export BLOCKVAULT_FUZZ_TMP=$scratch
if [ -n "${FUZZ_STRICT:-}" ]; then export BLOCKVAULT_FUZZ_STRICT=1; fi

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    before=$(ls "$artifacts")
    log=$scratch/$t.log
    echo "== $t: ${secs}s"
    rc=0
    # The target's init block writes seed objects into its corpus folder first.
    BLOCKVAULT_FUZZ_SEED_DIR=$corpus cargo fuzz run -s "$sanitizer" "$t" "$corpus" -- \
        -max_total_time="$secs" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" \
        -print_final_stats=1 >"$log" 2>&1 || rc=$?
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 |
        sed -E 's/^#([0-9]+)[[:space:]]+DONE[[:space:]]+/runs: \1 /' || true)
    summary+=("$(printf '%-11s rc=%-3s %s' "$t" "$rc" "${stats:-no final stats}")")
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "!! $t failed (exit $rc); end of its log:"
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$log" | tail -n 60
        for f in $(ls "$artifacts"); do
            if ! grep -qxF "$f" <<<"$before"; then
                size=$(wc -c <"$artifacts/$f")
                echo "!! input $artifacts/$f ($size bytes; hex$([ "$size" -le 4096 ] || echo ', first 4096 bytes')):"
                head -c 4096 "$artifacts/$f" | od -An -v -tx1 | tr -d ' \n' | fold -w 128
                echo
            fi
        done
    else
        echo "   $stats"
    fi
done

echo "== summary (${secs}s per target, build ${build_s}s, total $(( $(date +%s) - t0 ))s)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all ${#targets[@]} targets ran without a crash"
