#!/usr/bin/env bash
# tools/bench_qmp.sh — issue 13's figures: backing up a running VM through QMP.
#
#   tools/bench_qmp.sh                 # files in $BENCH_DIR (default /work/bench)
#   BLOCKVAULT_TEST_QEMU_SYSTEM=/opt/qemu-7.2/qemu-system-x86_64 tools/bench_qmp.sh
#
# QEMU runs without a guest (`-machine none`); the "guest" writes through writable FUSE
# exports of its drives (python3 does the writing and talks QMP on a second monitor).
#   1. stall: 4 drives of 1 GiB (64 MiB of random data each), a full group backup, then
#      ROUNDS (default 5) incrementals while a probe writes 4 KiB blocks to drive 0 back to
#      back; per run: QEMU's transaction time (`transaction_seconds`) and the probe's longest
#      write during the run, against its longest write in as long a run without a backup.
#      Goal: the transaction under 50 ms.
#   2. throughput: a 2 GiB qcow2 with 1 GiB of data (512 MiB random, 512 MiB base64 text)
#      backed up as a file, then the same image as the drive of a running QEMU (fresh vaults,
#      page cache hot for both).
#   3. 1 TiB: a 1 TiB qcow2 (64 KiB clusters, 1 GiB of random data in 64 places) as a running
#      VM's drive; a full backup through QMP, then 256 writes of 256 KiB (64 MiB) through the
#      guest, then the incremental under /usr/bin/time -v (wall, peak RSS), QMP set-up and
#      tear-down included. Goal: under 5 s.
# Env: BENCH_DIR, ROUNDS, KEEP=1 (keep $BENCH_DIR/qmp-PID), BLOCKVAULT_TEST_QEMU_SYSTEM.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/work/bench}
ROUNDS=${ROUNDS:-5}
QEMU=${BLOCKVAULT_TEST_QEMU_SYSTEM:-qemu-system-x86_64}
MIB=$((1 << 20))

say() { printf '[bench_qmp] %s\n' "$*" >&2; }
die() { printf '[bench_qmp] error: %s\n' "$*" >&2; exit 1; }
for tool in qemu-img qemu-io /usr/bin/time python3 "$QEMU"; do
  command -v "$tool" >/dev/null || die "missing $tool (apt-get install -y qemu-utils qemu-system-x86 time python3)"
done
[ -e /dev/fuse ] || die "no /dev/fuse: the guest writes through FUSE exports"

mkdir -p "$BENCH_DIR"
WORK=$(cd "$BENCH_DIR" && pwd)/qmp-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/logs"
LOGS=$WORK/logs

echo "date:  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "load:  $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min)"
echo "qemu:  $("$QEMU" --version | head -1)"
say "cargo build --release --bin blockvault"
(cd "$ROOT" && cargo build --release --bin blockvault -q) || die "release build failed"
cp "$ROOT/target/release/blockvault" "$WORK/blockvault"
echo "build: $("$WORK/blockvault" --version) (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"

# The python side: QMP on the control monitor, guest writes, the write-latency probe.
cat >"$WORK/vm.py" <<'EOF'
import json, os, random, socket, sys, threading, time

def qmp(sock):
    s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rw")
    def read():
        while True:
            m = json.loads(f.readline())
            if "event" not in m:
                return m
    read()
    def call(cmd, **args):
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); f.flush()
        r = read()
        if "error" in r:
            sys.exit(f"{cmd}: {r['error']}")
        return r["return"]
    call("qmp_capabilities")
    return call

cmd = sys.argv[1]
if cmd == "fuse":  # fuse CTL NODE=FILE...
    call = qmp(sys.argv[2])
    for pair in sys.argv[3:]:
        node, path = pair.split("=", 1)
        open(path, "a").close()
        call("block-export-add", type="fuse", id="guest-" + node, **{"node-name": node},
             mountpoint=path, writable=True)
elif cmd == "scatter":  # scatter FILE COUNT LEN SEED: COUNT random writes of LEN bytes
    path, count, length, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    rnd = random.Random(seed); fd = os.open(path, os.O_WRONLY); size = os.fstat(fd).st_size
    slots = rnd.sample(range(size // length), count)
    for s in slots:
        os.pwrite(fd, os.urandom(length), s * length)
    os.close(fd)
elif cmd == "probe":  # probe FILE -- COMMAND...: longest 4 KiB write while COMMAND runs
    path, command = sys.argv[2], sys.argv[4:]
    fd = os.open(path, os.O_WRONLY); stop = [False]; worst = [0.0]; n = [0]
    def writer():
        block = os.urandom(4096)
        while not stop[0]:
            t = time.monotonic(); os.pwrite(fd, block, (n[0] % 4096) * 4096)
            worst[0] = max(worst[0], time.monotonic() - t); n[0] += 1
    th = threading.Thread(target=writer); th.start()
    import subprocess
    rc = subprocess.call(command) if command != ["sleep"] else (time.sleep(3) or 0)
    stop[0] = True; th.join()
    print(json.dumps({"worst_write_s": worst[0], "writes": n[0], "rc": rc}))
EOF

# start_vm NAME DRIVE...: QEMU with qcow2 drives d0, d1, ... (background, killed at exit);
# sets QMP (blockvault's socket) and CTL (the control socket), then exports each drive over
# FUSE at $WORK/NAME-dI.guest.
start_vm() {
  local name=$1; shift
  QMP=$WORK/$name.qmp; CTL=$WORK/$name.ctl
  local args=(-machine none -nodefaults -display none -name "$name"
    -qmp "unix:$QMP,server=on,wait=off" -qmp "unix:$CTL,server=on,wait=off")
  local i=0 fuse=()
  for img in "$@"; do
    args+=(-blockdev "driver=qcow2,node-name=d$i,file.driver=file,file.filename=$img")
    fuse+=("d$i=$WORK/$name-d$i.guest"); i=$((i + 1))
  done
  "$QEMU" "${args[@]}" 2>>"$LOGS/qemu.log" &
  PIDS+=($!)
  for _ in $(seq 200); do [ -S "$CTL" ] && break; sleep 0.05; done
  python3 "$WORK/vm.py" fuse "$CTL" "${fuse[@]}"
}

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

# ---- 1. stall of the transaction, 4 drives ---------------------------------------------------
say "1. four 1 GiB drives, 64 MiB of random data each"
for i in 0 1 2 3; do
  qemu-img create -q -f qcow2 "$WORK/s$i.qcow2" 1G
  head -c $((64 * MIB)) /dev/urandom >"$WORK/pattern"
  qemu-io -f qcow2 -c "write -q -s $WORK/pattern $((i * 128 * MIB)) 64M" "$WORK/s$i.qcow2" >/dev/null
done
rm -f "$WORK/pattern"
start_vm stall "$WORK"/s{0,1,2,3}.qcow2
BV=("$WORK/blockvault" --vault "$WORK/vault-stall" --keystore "$WORK/keystore")
"${BV[@]}" init >/dev/null
MAP=d0=s0,d1=s1,d2=s2,d3=s3
"${BV[@]}" --json backup "qmp://$QMP" --disk-map $MAP >"$LOGS/stall-full.json"
python3 "$WORK/vm.py" probe "$WORK/stall-d0.guest" -- sleep >"$LOGS/stall-baseline.json"
echo
echo "1. transaction stall, 4 drives (goal < 50 ms)"
printf '%-10s %16s %22s %12s\n' run transaction_ms longest_guest_write_ms run_s
printf '%-10s %16s %22s %12s\n' baseline - "$(field "$LOGS/stall-baseline.json" 'round(d["worst_write_s"]*1000,1)')" 3.0
for r in $(seq "$ROUNDS"); do
  python3 "$WORK/vm.py" scatter "$WORK/stall-d$((r % 4)).guest" 64 65536 "$r"
  python3 "$WORK/vm.py" probe "$WORK/stall-d0.guest" -- "${BV[@]}" --json backup "qmp://$QMP" --disk-map $MAP \
    >"$LOGS/stall-probe-$r.json" 2>>"$LOGS/stall.err"
  # The probe's stdout holds blockvault's JSON and then its own line.
  python3 - "$LOGS/stall-probe-$r.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
doc, end = json.JSONDecoder().raw_decode(text)
probe = json.loads(text[end:].strip())
print(f"{'inc':<10} {doc['transaction_seconds']*1000:16.1f} {probe['worst_write_s']*1000:22.1f} "
      f"{sum(d['seconds'] for d in doc['disks']):12.2f}")
EOF
done

# ---- 2. throughput: a file against a running QEMU --------------------------------------------
say "2. a 2 GiB qcow2 with 1 GiB of data"
head -c $((512 * MIB)) /dev/urandom >"$WORK/t.raw"
head -c $((384 * MIB)) /dev/urandom | base64 -w 0 | head -c $((512 * MIB)) >>"$WORK/t.raw"
truncate -s 2G "$WORK/t.raw"
qemu-img convert -f raw -O qcow2 "$WORK/t.raw" "$WORK/t.qcow2"
rm -f "$WORK/t.raw"
cat "$WORK/t.qcow2" >/dev/null
BVF=("$WORK/blockvault" --vault "$WORK/vault-file" --keystore "$WORK/keystore")
"${BVF[@]}" init >/dev/null
/usr/bin/time -v -o "$LOGS/tp-file.time" "${BVF[@]}" --json backup "$WORK/t.qcow2" --disk t >"$LOGS/tp-file.json"
start_vm tp "$WORK/t.qcow2"
BVQ=("$WORK/blockvault" --vault "$WORK/vault-qmp" --keystore "$WORK/keystore")
"${BVQ[@]}" init >/dev/null
/usr/bin/time -v -o "$LOGS/tp-qmp.time" "${BVQ[@]}" --json backup "qmp://$QMP" --disk-map d0=t >"$LOGS/tp-qmp.json"
wall() { awk -F': ' '/Elapsed/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$1"; }
rss() { awk -F': ' '/Maximum resident/ {printf "%.0f", $2/1024}' "$1"; }
echo
echo "2. full backup of 2 GiB (1 GiB of data): file vs running QEMU"
printf '%-14s %8s %10s %12s %12s\n' source wall_s MiB/s read_MiB stored_MiB
for k in file qmp; do
  python3 - "$LOGS/tp-$k.json" "$k" "$(wall "$LOGS/tp-$k.time")" <<'EOF'
import json, sys
d, w = json.load(open(sys.argv[1])), float(sys.argv[3])
print(f"{sys.argv[2]:<14} {w:8.2f} {d['bytes_read']/1048576/w:10.0f} {d['bytes_read']/1048576:12.0f} "
      f"{d['bytes_stored']/1048576:12.0f}")
EOF
done

# ---- 3. 1 TiB, 64 MiB changed ----------------------------------------------------------------
say "3. a 1 TiB qcow2, 1 GiB of random data"
IMG=$WORK/big.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" 1T
for i in $(seq 0 63); do
  head -c $((16 * MIB)) /dev/urandom >"$WORK/pattern"
  qemu-io -f qcow2 -c "write -q -s $WORK/pattern $((i * (1 << 34) + (i % 7) * MIB)) 16M" "$IMG" >/dev/null
done
rm -f "$WORK/pattern"
start_vm big "$IMG"
BVB=("$WORK/blockvault" --vault "$WORK/vault-big" --keystore "$WORK/keystore")
"${BVB[@]}" init >/dev/null
/usr/bin/time -v -o "$LOGS/big-full.time" "${BVB[@]}" --json backup "qmp://$QMP" --disk-map d0=big >"$LOGS/big-full.json"
python3 "$WORK/vm.py" scatter "$WORK/big-d0.guest" 256 262144 7
/usr/bin/time -v -o "$LOGS/big-inc.time" "${BVB[@]}" --json backup "qmp://$QMP" --disk-map d0=big >"$LOGS/big-inc.json"
echo
echo "3. 1 TiB drive of a running VM, 64 MiB changed (goal < 5 s end to end)"
printf '%-12s %8s %10s %10s %12s %s\n' run wall_s rss_MiB read_MiB stored_MiB change
for k in full inc; do
  python3 - "$LOGS/big-$k.json" "$k" "$(wall "$LOGS/big-$k.time")" "$(rss "$LOGS/big-$k.time")" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<12} {float(sys.argv[3]):8.2f} {sys.argv[4]:>10} {d['bytes_read']/1048576:10.1f} "
      f"{d['bytes_stored']/1048576:12.1f} {d['change_source']}")
EOF
done
