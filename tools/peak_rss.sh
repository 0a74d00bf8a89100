#!/usr/bin/env bash
# peak_rss.sh [-o FILE] CMD [ARGS...]
#
# Run CMD and measure it: wall seconds (nanosecond clock), user and system CPU seconds, and
# peak resident set size (KiB, of the largest process of the tree: GNU time's %M).
# Prints one line "wall_s user_s sys_s peak_rss_kib exit_code" to FILE (default: stderr).
# CMD's stdout and stderr pass through untouched; exits with CMD's exit code.
#
#   tools/peak_rss.sh target/release/blockvault --vault v backup disk.raw --disk d
#   tools/peak_rss.sh -o m.txt restic backup disk.raw && read -r wall user sys rss rc < m.txt
#
# Needs GNU time at /usr/bin/time (Debian/Ubuntu: apt-get install -y time).
set -euo pipefail

out=/dev/stderr
if [ "${1:-}" = "-o" ]; then
  out=${2:?-o needs a file}
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: peak_rss.sh [-o FILE] CMD [ARGS...]" >&2; exit 2; }

if [ ! -x /usr/bin/time ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq time >/dev/null
  else
    echo "peak_rss.sh: /usr/bin/time missing (apt-get install -y time)" >&2
    exit 2
  fi
fi

tf=$(mktemp)
trap 'rm -f "$tf"' EXIT
t0=$(date +%s%N)
rc=0
/usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" || rc=$?
t1=$(date +%s%N)
# On failure GNU time writes "Command exited with non-zero status N" before the figures.
read -r _e user sys rss < <(tail -n 1 "$tf")
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
echo "$wall $user $sys $rss $rc" >"$out"
exit "$rc"
