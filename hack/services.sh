#!/usr/bin/env bash
# Local services for imageindex, on loopback, data under $STATE:
#   Milvus 2.3.5 standalone (the PyPI wheel's real server binary, started directly),
#   MariaDB (Debian package, own datadir/port/socket, a real user with a password),
#   SeaweedFS S3 (`weed mini`, SigV4 with static keys; bucket imageindex-public may be read
#   anonymously, as a public Google Cloud Storage bucket is through the XML API),
#   Azurite's Blob service (npm, shared-key auth with our own account) for az:// sources.
# Usage: hack/services.sh up|down|status|env      (idempotent; `env` prints exports for the binary and tests)
source "$(dirname "$0")/lib.sh"
mkdir -p "$STATE"
MILVUS_BIN=$CACHE/milvus-2.3.5/bin

milvus_healthy() { [[ $(curl -fsS "http://127.0.0.1:$MILVUS_HEALTH_PORT/healthz") == *OK* ]]; }
mysql_ready() { mariadb-admin --protocol=socket -S "$STATE/mysql/mysqld.sock" -uroot ping; }
s3_ready() { curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"; }
azure_ready() { curl -s -o /dev/null "http://127.0.0.1:$AZURE_PORT/"; }

up_milvus() {
  if [[ -n $(running_pid milvus) ]]; then return; fi
  port_free "$MILVUS_PORT" milvus MILVUS_PORT || exit 1
  port_free "$MILVUS_HEALTH_PORT" "milvus health" MILVUS_HEALTH_PORT || exit 1
  local dir=$STATE/milvus
  mkdir -p "$dir/configs" "$dir/logs" "$dir/data" "$dir/run"
  # Render the wheel's config template: our paths, the template's defaults for everything else.
  "$PY" - "$dir" <<'PYEOF'
import os, re, sys, milvus
d = sys.argv[1]
data = os.path.join(os.path.dirname(milvus.__file__), "data")
values = {"etcd_data_dir": f"{d}/data/etcd.data", "local_storage_dir": f"{d}/data",
          "rocksmq_data_dir": f"{d}/data/rocksmq", "system_log_path": f"{d}/logs",
          "etcd_log_path": f"{d}/logs/etcd.log"}
def sub(m):
    key, _, default = m.group(1).partition(":")
    key = re.sub(r"\(.*\)", "", key).strip()
    return values.get(key, default.strip())
text = re.sub(r"\{\{(.*?)\}\}", sub, open(os.path.join(data, "config.yaml.template")).read())
open(f"{d}/configs/milvus.yaml", "w").write(text)
open(f"{d}/configs/glog.conf", "w").write(open(os.path.join(data, "glog.conf")).read())
PYEOF
  log "starting milvus (grpc :$MILVUS_PORT, health :$MILVUS_HEALTH_PORT)"
  start_daemon milvus "$dir" "$dir/logs/milvus.log" env DEPLOY_MODE=STANDALONE METRICS_PORT="$MILVUS_HEALTH_PORT" \
    MILVUS_RUN_DIR="$dir/run" LD_LIBRARY_PATH="$MILVUS_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$MILVUS_BIN/milvus" run standalone
}

up_mysql() {
  if [[ -n $(running_pid mysql) ]]; then return; fi
  port_free "$MYSQL_PORT" mariadb MYSQL_PORT || exit 1
  local dir=$STATE/mysql
  if [[ ! -d $dir/data/mysql ]]; then
    mkdir -p "$dir/data"
    mariadb-install-db --no-defaults --datadir="$dir/data" --auth-root-authentication-method=socket \
      --user="$(id -un)" >"$dir/install.log" 2>&1
  fi
  log "starting mariadb (:$MYSQL_PORT)"
  start_daemon mysql "$dir" "$dir/stdout.log" mariadbd --no-defaults --datadir="$dir/data" --port="$MYSQL_PORT" \
    --bind-address=127.0.0.1 --socket="$dir/mysqld.sock" --pid-file="$dir/mysqld.pid" --user="$(id -un)" \
    --log-error="$dir/error.log" --skip-name-resolve --character-set-server=utf8mb4 \
    --innodb-buffer-pool-size=256M --max-connections=500
  wait_for mariadb 60 mysql_ready
  # Every start (all of it is idempotent): the catalog's database, and databases named
  # <db>_<anything> that tests make fresh (the migrations applied to an empty catalog).
  mariadb --protocol=socket -S "$dir/mysqld.sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $MYSQL_DB CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON \`$MYSQL_DB\`.* TO '$MYSQL_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON \`$MYSQL_DB\`.* TO '$MYSQL_USER'@'localhost';
GRANT ALL PRIVILEGES ON \`${MYSQL_DB}\\_%\`.* TO '$MYSQL_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
}

up_s3() {
  if [[ -n $(running_pid s3) ]]; then return; fi
  port_free "$S3_PORT" s3 S3_PORT || exit 1
  local dir=$STATE/s3
  mkdir -p "$dir/data"
  cat >"$dir/s3.json" <<JSON
{"identities": [{"name": "imageindex",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
 {"name": "anonymous", "actions": ["Read:imageindex-public", "List:imageindex-public"]}]}
JSON
  log "starting seaweedfs s3 (:$S3_PORT)"
  start_daemon s3 "$dir" "$dir/weed.log" "$VENV/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -admin.ui=false -bucket=images -s3.port="$S3_PORT" -s3.config="$dir/s3.json"
}

up_azure() {
  if [[ -n $(running_pid azure) ]]; then return; fi
  port_free "$AZURE_PORT" azurite AZURE_PORT || exit 1
  local dir=$STATE/azure
  mkdir -p "$dir/data"
  log "starting azurite blob (:$AZURE_PORT)"
  start_daemon azure "$dir" "$dir/azurite.log" env AZURITE_ACCOUNTS="$AZURE_ACCOUNT:$AZURE_KEY" \
    "$CACHE/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$AZURE_PORT" \
    --location "$dir/data" --disableTelemetry --skipApiVersionCheck --loose
}

down_one() {
  local pid; pid=$(running_pid "$1") || true
  if [[ -n $pid ]]; then
    log "stopping $1 (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/$1.pid"
}

print_env() {
  cat <<ENV
export IMAGEINDEX_MILVUS_URL=http://127.0.0.1:$MILVUS_PORT
export IMAGEINDEX_MYSQL_URL=mysql://$MYSQL_USER:$MYSQL_PASSWORD@127.0.0.1:$MYSQL_PORT/$MYSQL_DB
export IMAGEINDEX_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export IMAGEINDEX_AZURE_ENDPOINT=http://127.0.0.1:$AZURE_PORT/$AZURE_ACCOUNT
export AZURE_STORAGE_ACCOUNT_NAME=$AZURE_ACCOUNT
export AZURE_STORAGE_ACCOUNT_KEY=$AZURE_KEY
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=us-east-1
# Public buckets only: the gs:// test reads one without a Google account.
export GOOGLE_SKIP_SIGNATURE=true
export ORT_DYLIB_PATH=$(ort_dylib)
export IMAGEINDEX_MODEL=$CACHE/models/resnet50-random.onnx
ENV
}

case "${1:-}" in
  up)
    up_milvus; up_s3; up_azure; up_mysql
    wait_for milvus 120 milvus_healthy || { tail -20 "$STATE/milvus/logs/milvus.log" >&2; exit 1; }
    wait_for s3 60 s3_ready || { tail -20 "$STATE/s3/weed.log" >&2; exit 1; }
    wait_for azurite 60 azure_ready || { tail -20 "$STATE/azure/azurite.log" >&2; exit 1; }
    print_env >"$STATE/env"
    log "services up; env in $STATE/env"
    ;;
  down) down_one milvus; down_one s3; down_one azure; down_one mysql ;;
  status)
    for s in milvus mysql s3 azure; do printf '%-7s %s\n' "$s" "$(running_pid $s || echo stopped)"; done ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
