#!/usr/bin/env bash
# A bucket of many objects (issue 14): for each size in SIZES, the listing alone (time and rate),
# the first plan of the bucket (everything new, recorded as work), catalog rows written per second
# and read back in key order, the plan of the unchanged bucket (one listing merged with one read
# of the catalog), the LIST requests one sync makes and the planner's peak RSS (benches/scale.rs,
# one process per size); then Debian's rclone listing the same objects, the anchor for listing
# speed. The buckets are filled once (kept under .state/s3 with the data).
#   SIZES="10000 100000 1000000" SHARDS=4 hack/bench-scale.sh    (1M: ~1 GB of disk, minutes to fill)
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
bucket=imageindex-scale
curl -fsS -o /dev/null -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
  "$IMAGEINDEX_S3_ENDPOINT/$bucket" || true # already there
scale() { cargo bench --locked --quiet --bench scale -- "$@"; }
mkdir -p "$STATE/scale"
for n in $sizes; do
  if [[ ! -f $STATE/scale/filled-$n ]]; then
    scale fill "$n" && touch "$STATE/scale/filled-$n"
  fi
done
log "imageindex: one listing per sync, merged with the catalog a page at a time"
for n in $sizes; do scale measure "$n" | tail -n1; done
log "rclone lsf (Debian's rclone), the same objects"
export RCLONE_CONFIG_SCALE_TYPE=s3 RCLONE_CONFIG_SCALE_PROVIDER=Other RCLONE_CONFIG_SCALE_REGION=us-east-1 \
  RCLONE_CONFIG_SCALE_ENDPOINT=$IMAGEINDEX_S3_ENDPOINT RCLONE_CONFIG_SCALE_ACCESS_KEY_ID=$S3_ACCESS_KEY \
  RCLONE_CONFIG_SCALE_SECRET_ACCESS_KEY=$S3_SECRET_KEY
for n in $sizes; do
  out=$STATE/scale/rclone-$n.txt
  # AWS_CA_BUNDLE (set on some machines) makes rclone fail on its own HTTP transport.
  /usr/bin/time -f "%e %M" -o "$STATE/scale/rclone-time" env -u AWS_CA_BUNDLE rclone lsf -R --files-only "scale:$bucket/n$n" >"$out"
  awk -v n="$(wc -l <"$out")" '{ printf "%8d objects | rclone lsf %6.2f s, %7.0f objects/s | peak RSS %.0f MiB\n", n, $1, n / $1, $2 / 1024 }' \
    "$STATE/scale/rclone-time"
done
