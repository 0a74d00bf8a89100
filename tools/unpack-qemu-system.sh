#!/usr/bin/env bash
# Unpack Debian 12's qemu-system-x86 (QEMU 7.2) under DIR (default /opt/qemu-7.2) without
# installing it, and write DIR/qemu-system-x86_64, a wrapper the QMP tests use through
# BLOCKVAULT_TEST_QEMU_SYSTEM.
#
# Why not `apt-get install qemu-system-x86`: Debian 12's package needs qemu-utils of its own
# version (7.2), so on a machine with a newer qemu-utils (the 10.0 backport these machines ship)
# apt refuses it ("qemu-utils : Breaks: qemu-system-common (< 1:8.0…)"), and forcing it
# downgrades qemu-img/qemu-io/qemu-nbd for every other test. Unpacked, QEMU 7.2 runs beside the
# newer tools. (On a Debian 12 machine with its own qemu-utils 7.2, `apt-get install
# qemu-system-x86` is simpler, and the tests find it on PATH.)
set -euo pipefail
dir="${1:-/opt/qemu-7.2}"
if [ -x "$dir/qemu-system-x86_64" ]; then
    echo "$dir/qemu-system-x86_64"
    exit 0
fi
version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
# Every package apt would install with qemu-system-x86 at that version, qemu-utils excepted.
mapfile -t pkgs < <(apt-get install -s -q --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$version" "qemu-utils=$version" 2>/dev/null |
    awk '/^Inst / && $2 != "qemu-utils" {print $2}')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "${pkgs[@]}" >&2)
mkdir -p "$dir"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dir"; done
cat > "$dir/qemu-system-x86_64" <<WRAP
#!/bin/sh
# Debian 12's QEMU $version unpacked by tools/unpack-qemu-system.sh (not installed).
R=$dir
export LD_LIBRARY_PATH="\$R/usr/lib/x86_64-linux-gnu:\$R/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/qemu" "\$@"
WRAP
chmod 755 "$dir/qemu-system-x86_64"
"$dir/qemu-system-x86_64" --version >&2
echo "$dir/qemu-system-x86_64"
