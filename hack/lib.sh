# shellcheck shell=bash disable=SC2034 # its settings are read by the scripts that source it
# Shared settings for the hack/ scripts. Source it; do not run it.
# Two places: CACHE (outside the clone, survives fresh clones: venv, unpacked Milvus, models, cargo target)
# and STATE (inside the clone, ignored: service data, logs, pid files).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${IMAGEINDEX_CACHE:-$HOME/.cache/imageindex}
STATE=${IMAGEINDEX_STATE:-$ROOT/.state}
VENV=$CACHE/venv
PY=$VENV/bin/python
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}

MILVUS_PORT=${MILVUS_PORT:-19530}
MILVUS_HEALTH_PORT=${MILVUS_HEALTH_PORT:-9091}
MYSQL_PORT=${MYSQL_PORT:-3307}
S3_PORT=${S3_PORT:-8333}
AZURE_PORT=${AZURE_PORT:-10000}
MYSQL_USER=imageindex
MYSQL_PASSWORD=${MYSQL_PASSWORD:-imageindex-local}
MYSQL_DB=imageindex
S3_ACCESS_KEY=${S3_ACCESS_KEY:-imageindex}
S3_SECRET_KEY=${S3_SECRET_KEY:-imageindex-local-secret}
# Azurite's account: our own name and key (AZURITE_ACCOUNTS), not the emulator's well-known pair.
AZURE_ACCOUNT=imageindex
AZURE_KEY=${AZURE_KEY:-aW1hZ2VpbmRleC1sb2NhbC1henVyaXRlLWtleS0wMDAwMDAwMDAwMDA=}

log() { printf '\033[1m[hack]\033[0m %s\n' "$*" >&2; }

# wait_for NAME SECONDS CMD...: poll CMD until it succeeds or the deadline passes.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "$name did not become ready in ${secs}s"; return 1; fi
    sleep 0.3
  done
}

# Running PID from a pid file, or nothing.
running_pid() {
  local f=$STATE/$1.pid
  [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

# start_daemon NAME DIR LOG CMD...: runs CMD from DIR in a session of its own (so `down` can stop
# its whole process group) and records its real PID: the process writes its own PID, then execs.
start_daemon() {
  local name=$1 dir=$2 log=$3; shift 3
  rm -f "$STATE/$name.pid"
  # shellcheck disable=SC2016 # $$ is the new shell's PID, expanded by it
  (cd "$dir" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE/$name.pid" "$@" >"$log" 2>&1 </dev/null) &
  wait_for "$name to start" 10 test -s "$STATE/$name.pid"
}

# The local apiservers' credentials (hack/kube.sh's, hack/cluster.sh's): a kubeconfig FILE for
# SERVER trusting CA, as USER authenticated by AUTH (`token: "..."` or `tokenFile: "..."`).
write_kubeconfig() { # FILE SERVER CA USER AUTH
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$2", certificate-authority: "$3"}
users:
- name: $4
  user: {$5}
contexts:
- name: local
  context: {cluster: local, user: $4}
current-context: local
EOF
}

# A CA in DIR (ca.key, ca.crt) named CN.
make_ca() { # DIR CN
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$2" \
    -keyout "$1/ca.key" -out "$1/ca.crt" 2>/dev/null
}

# NAME.key and NAME.crt in DIR, signed by DIR's CA, for SUBJECT and the subjectAltName SAN if given.
make_cert() { # DIR NAME SUBJECT [SAN]
  local dir=$1 ext=/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "$3" -keyout "$dir/$2.key" -out "$dir/$2.csr" 2>/dev/null
  if [[ -n ${4:-} ]]; then ext=$dir/$2.ext; echo "subjectAltName=$4" >"$ext"; fi
  openssl x509 -req -in "$dir/$2.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$dir/$2.crt" 2>/dev/null
}

# The service-account signing key pair in DIR (sa.key, sa.pub).
make_sa_key() { # DIR
  openssl genrsa -out "$1/sa.key" 2048 2>/dev/null
  openssl rsa -in "$1/sa.key" -pubout -out "$1/sa.pub" 2>/dev/null
}

# etcd for a local apiserver: daemon PID-NAME, data and log in DIR, member NAME, clients on PORT
# and peers on PORT+1 (loopback only), waited for until healthy.
start_etcd() { # PID-NAME DIR NAME PORT
  local port=$4
  start_daemon "$1" "$2" "$2/etcd.log" etcd --name "$3" --data-dir "$2/etcd" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$3=http://127.0.0.1:$((port + 1))"
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$port/health"
}

# A random bearer token.
new_token() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }

# Fails if something that is not ours listens on the port.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    log "port $1 ($2) is already in use by another process; stop it or set ${3}=<free port>"
    return 1
  fi
}

ort_dylib() {
  local f
  for f in "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*; do
    [[ -e $f ]] && echo "$f" && break
  done
  return 0
}
