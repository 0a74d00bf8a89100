#!/usr/bin/env bash
# quickstart.sh [IMAGE] — build blockvault and back up a disk image into ./vault.
#
# With no IMAGE, a 256 MiB sample disk is made first (sample-disk.raw: an ext4 filesystem
# filled with files from /usr/share, then zeros), so this works on a fresh machine.
# The vault uses the default platform-managed key; the output says where the key store is.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-}
if [ -z "$IMAGE" ]; then
  IMAGE=sample-disk.raw
  if [ ! -f "$IMAGE" ]; then
    echo "[quickstart] making $IMAGE (256 MiB ext4 image with files from /usr/share/doc)"
    truncate -s 256M "$IMAGE"
    if command -v mkfs.ext4 >/dev/null; then
      mkfs.ext4 -q -F -d /usr/share/doc "$IMAGE" 2>/dev/null || mkfs.ext4 -q -F "$IMAGE"
    else
      # No mkfs: some real bytes at a few places, holes elsewhere.
      for off in 0 64 130; do
        head -c 8M /usr/bin/* 2>/dev/null | dd of="$IMAGE" bs=1M seek="$off" conv=notrunc status=none || true
      done
    fi
  fi
fi
cargo build --release --quiet
./target/release/blockvault --vault ./vault backup "$IMAGE" --disk "$(basename "$IMAGE" | sed 's/\.[^.]*$//')"
./target/release/blockvault --vault ./vault snapshots
