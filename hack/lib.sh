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
  (cd "$dir" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE/$name.pid" "$@" >"$log" 2>&1 </dev/null) &
  wait_for "$name to start" 10 test -s "$STATE/$name.pid"
}

# Fails if something that is not ours listens on the port.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    log "port $1 ($2) is already in use by another process; stop it or set ${3}=<free port>"
    return 1
  fi
}

ort_dylib() { ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1; }
