#!/bin/bash
# mutate.sh MODE IMAGE [SEED] — deterministically simulate a day of VM writes, in place.
#   scatter : ~1% of the image rewritten as uniformly scattered, 4 KiB-aligned
#             4 KiB writes of random data (random.Random(SEED), default SEED=1)
#   contig  : one contiguous 64 MiB region of random data at a fixed,
#             4 KiB-aligned but not 1 MiB-aligned offset (1000 MiB + 12 KiB)
# Writes IMAGE.changes: one "offset length" line per written extent (sorted),
# used by tools/bench.sh (the --changed list and the ideal bytes changed).
set -euo pipefail
MODE=${1:?usage: mutate.sh scatter|contig IMAGE [SEED]}
IMG=${2:?usage: mutate.sh scatter|contig IMAGE [SEED]}
SEED=${3:-1}
/usr/bin/python3 - "$MODE" "$IMG" "$SEED" <<'EOF'
import os, random, sys
mode, img, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
size = os.path.getsize(img)
BS = 4096
fd = os.open(img, os.O_RDWR)
ext = []
if mode == "scatter":
    nblk = size // BS
    k = round(nblk * 0.01)
    blocks = rng.sample(range(nblk), k)          # distinct blocks, random order
    for b in blocks:                             # issue in random order, like a guest
        os.pwrite(fd, rng.randbytes(BS), b * BS)
    ext = sorted((b * BS, BS) for b in blocks)
elif mode == "contig":
    off, ln = 1000 * 2**20 + 3 * BS, 64 * 2**20
    if off + ln > size:                          # small test images only
        ln = min(ln, size // 8); off = size // 4 + 3 * BS
    os.pwrite(fd, rng.randbytes(ln), off)
    ext = [(off, ln)]
else:
    sys.exit("mode must be scatter or contig")
os.fsync(fd); os.close(fd)
with open(img + ".changes", "w") as f:
    for o, l in ext:
        f.write(f"{o} {l}\n")
tot = sum(l for _, l in ext)
print(f"[mutate] {mode}: {len(ext)} extents, {tot} bytes ({100*tot/size:.2f}% of {size})")
EOF
