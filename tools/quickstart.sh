#!/usr/bin/env bash
# quickstart.sh [IMAGE] — build blockvault, then the whole round trip on a disk image:
# init a vault, back the image up, list the snapshots, restore the latest one and compare it
# with the image byte for byte.
#
# With no IMAGE, a 256 MiB sample disk is made first (sample-disk.raw: an ext4 filesystem
# filled with files from /usr/share/doc, then zeros), so this works on a fresh machine.
#
# Everything stays in the repository folder (all git-ignored): the vault in ./vault, its key
# store in ./keystore (normally the key store lives outside the vault, by default in
# ~/.local/share/blockvault/keystore; here it sits beside it so that deleting the folder
# leaves nothing behind), the restored image in ./restored-NAME.raw. Run it again and it
# adds an incremental snapshot to the same vault.
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
DISK=$(basename "$IMAGE" | sed 's/\.[^.]*$//')
RESTORED=restored-$DISK.raw

say() { printf '\n[quickstart] %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cargo build --release --quiet
bv() { run ./target/release/blockvault --vault ./vault --keystore ./keystore "$@"; }

if [ ! -e vault/config ]; then
  say "1. init: a new vault in ./vault, its key in ./keystore"
  bv init
fi
say "2. backup: $IMAGE as disk $DISK"
bv backup "$IMAGE" --disk "$DISK"
say "3. snapshots"
bv snapshots
say "4. restore the latest snapshot to $RESTORED"
bv restore "$DISK@latest" "$RESTORED" --force
say "5. compare"
run cmp "$IMAGE" "$RESTORED"
say "the restored image is identical to $IMAGE.
  Keep a copy of the key store elsewhere: without it the vault cannot be read. To move it, seal it
  under a passphrase: blockvault --vault ./vault --keystore ./keystore key export keys.bvexport
  (the passphrase from --passphrase-file F or BLOCKVAULT_EXPORT_PASSPHRASE)."
