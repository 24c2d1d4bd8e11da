#!/usr/bin/env bash
# A bucket of many objects (issue 14): for each size in SIZES, the listing alone (time and rate),
# the first plan of the bucket (everything new, recorded as work), catalog rows written per second
# and read back in key order, the plan of the unchanged bucket (one listing merged with one read
# of the catalog), the LIST requests one sync makes and the planner's peak RSS (benches/scale.rs,
# one process per size); then Debian's rclone listing the same objects, the anchor for listing
# speed. Each size in each of LAYOUTS (benches/scale.rs: flat, and nested folders beside sibling
# files that a tree listing returns out of byte order), and BASELINE's own benchmark (a commit; by
# default the last one before the plan sorted its listing, whose merge trusted the server's order)
# on the same buckets in the same run. Each measure gets a fresh database, so that the catalog's
# size is that bucket's alone. The buckets are filled once (kept under .state/s3 with the data).
#   SIZES="10000 100000 1000000" LAYOUTS="flat nested" hack/bench-scale.sh    (1M: ~1 GB, minutes to fill)
#   BASELINE= (empty) skips the baseline
source "$(dirname "$0")/lib.sh"
command -v rclone >/dev/null || {
  sudo_=""; [[ $(id -u) == 0 ]] || sudo_=sudo
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends rclone >/dev/null
}
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
source "$STATE/env"
cd "$ROOT"
sizes=${SIZES:-10000 100000}
layouts=${LAYOUTS:-flat nested}
baseline=${BASELINE-3a653b8}
bucket=imageindex-scale
curl -fsS -o /dev/null -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
  "$IMAGEINDEX_S3_ENDPOINT/$bucket" || true # already there
# The benchmark binary, built once: editing the tree while it runs changes nothing it measures.
# (copied: a later build would replace it in place).
bench_bin() {
  local built
  built=$(cargo bench --locked --no-run --bench scale 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n1)
  [[ -x $built ]] && cp "$built" "$STATE/scale/$1" && echo "$STATE/scale/$1"
}
mkdir -p "$STATE/scale"
scale_bin=$(bench_bin scale)
[[ -x $scale_bin ]] || { log "building benches/scale.rs failed"; exit 1; }
scale() { "$scale_bin" --bench "$@"; }
# The baseline's tree, unpacked outside the clone; it shares the cargo target dir (a path
# package's artifacts are keyed by its path, so the two builds do not evict each other).
if [[ -n $baseline ]]; then
  base_dir=$CACHE/baseline/$(git rev-parse --short "$baseline")
  [[ -f $base_dir/Cargo.toml ]] || { mkdir -p "$base_dir" && git archive "$baseline" | tar -x -C "$base_dir"; }
  log "building the baseline $baseline"
  base_bin=$(cd "$base_dir" && bench_bin "scale-$(basename "$base_dir")")
  [[ -x $base_bin ]] || { log "building the baseline's benches/scale.rs failed"; exit 1; }
  base_scale() { "$base_bin" --bench "$@"; }
fi
# A fresh database for one measure: the catalog's size on disk is then that bucket's alone.
fresh_db() {
  mariadb --protocol=socket -S "$STATE/mysql/mysqld.sock" -uroot <<SQL
DROP DATABASE IF EXISTS imageindex_scale;
CREATE DATABASE imageindex_scale CHARACTER SET utf8mb4;
GRANT ALL PRIVILEGES ON imageindex_scale.* TO '$MYSQL_USER'@'127.0.0.1';
SQL
  echo "mysql://$MYSQL_USER:$MYSQL_PASSWORD@127.0.0.1:$MYSQL_PORT/imageindex_scale"
}
mkdir -p "$STATE/scale"
for layout in $layouts; do
  for n in $sizes; do
    if [[ ! -f $STATE/scale/filled-$layout-$n ]]; then
      scale fill "$n" "$layout" && touch "$STATE/scale/filled-$layout-$n"
    fi
  done
done
for n in $sizes; do
  for layout in $layouts; do
    log "$n objects, $layout: imageindex (the plan sorts the listing, merges it with the catalog a page at a time)"
    IMAGEINDEX_MYSQL_URL=$(fresh_db) scale measure "$n" "$layout" | tail -n1
    if [[ -n $baseline ]]; then
      log "$n objects, $layout: baseline $baseline (its merge takes the server's order as byte order)"
      # The baseline benchmark knows one layout: each layout's bucket is given as its n<N>/ prefix.
      if [[ $layout == flat ]]; then
        IMAGEINDEX_MYSQL_URL=$(fresh_db) base_scale measure "$n" 2>&1 | tail -n1 || true
      else
        echo "(the baseline's bench has no nested layout: see the integration test of issue 32, which fails on it)"
      fi
    fi
  done
done
mariadb --protocol=socket -S "$STATE/mysql/mysqld.sock" -uroot -e "DROP DATABASE IF EXISTS imageindex_scale"
log "rclone lsf (Debian's rclone), the same objects"
export RCLONE_CONFIG_SCALE_TYPE=s3 RCLONE_CONFIG_SCALE_PROVIDER=Other RCLONE_CONFIG_SCALE_REGION=us-east-1 \
  RCLONE_CONFIG_SCALE_ENDPOINT=$IMAGEINDEX_S3_ENDPOINT RCLONE_CONFIG_SCALE_ACCESS_KEY_ID=$S3_ACCESS_KEY \
  RCLONE_CONFIG_SCALE_SECRET_ACCESS_KEY=$S3_SECRET_KEY
for layout in $layouts; do
  for n in $sizes; do
    out=$STATE/scale/rclone-$layout-$n.txt
    dir=n$n; [[ $layout == flat ]] || dir=$layout$n
    # AWS_CA_BUNDLE (set on some machines) makes rclone fail on its own HTTP transport.
    /usr/bin/time -f "%e %M" -o "$STATE/scale/rclone-time" env -u AWS_CA_BUNDLE rclone lsf -R --files-only "scale:$bucket/$dir" >"$out"
    awk -v n="$(wc -l <"$out")" -v l="$layout" '{ printf "%8d objects, %-6s | rclone lsf %6.2f s, %7.0f objects/s | peak RSS %.0f MiB\n", n, l, $1, n / $1, $2 / 1024 }' \
      "$STATE/scale/rclone-time"
  done
done
