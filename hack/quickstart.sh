#!/usr/bin/env bash
# One command from a fresh clone to a running search server on this machine:
# install, start Milvus + MariaDB + S3, make the model and sample images, index them, serve.
#   hack/quickstart.sh [FOLDER_OR_BUCKET_URL]     (default: generated sample images)
#   hack/quickstart.sh --check                      (CI: index, run one search, stop)
source "$(dirname "$0")/lib.sh"
check=0; src=""
for a in "$@"; do case $a in --check) check=1 ;; *) src=$a ;; esac; done

"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
model=$("$ROOT/hack/model.sh")
source "$STATE/env"
export IMAGEINDEX_MODEL=$model IMAGEINDEX_COLLECTION=${IMAGEINDEX_COLLECTION:-quickstart}
if [[ -z $src ]]; then
  src=$STATE/samples
  [[ -d $src ]] || "$PY" "$ROOT/hack/make-sample-images.py" "$src"
fi

# The dev profile: the fastest cold build (most dependencies unoptimised, no debug info), with the
# image crates optimised (Cargo.toml), so it indexes at the release build's speed; the tests share it.
log "building imageindex"
(cd "$ROOT" && cargo build --locked --quiet --bin imageindex)
bin=$CARGO_TARGET_DIR/debug/imageindex
log "indexing $src"
"$bin" index "$src"

port=${PORT:-8080}
# A token for the mutating routes (upload, delete), kept in the state dir.
token_file=$STATE/token
[[ -s $token_file ]] || (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$token_file")
query=$(find "$src" -name '*.jpg' -print -quit) # not | head -n1: under pipefail, find's SIGPIPE (141) would fail the script
cat <<MSG

  Search page: http://127.0.0.1:$port/
  Try:  curl -F image=@${query:-photo.jpg} -F topk=5 http://127.0.0.1:$port/img/search
        curl http://127.0.0.1:$port/progress
        curl -H "Authorization: Bearer \$(cat $token_file)" -F image=@photo.jpg http://127.0.0.1:$port/img/upload
  Stop the services with: hack/services.sh down

MSG
serve=("$bin" serve --listen "127.0.0.1:$port" --source "$src" --token-file "$token_file")
if ((check)); then
  "${serve[@]}" &
  pid=$!
  trap 'kill $pid 2>/dev/null' EXIT
  wait_for "search server" 60 curl -fsS "http://127.0.0.1:$port/healthz"
  out=$(curl -fsS -F "image=@$query" -F topk=3 "http://127.0.0.1:$port/img/search")
  echo "$out"
  grep -q "\"key\":\"${query#"$src"/}\"" <<<"$out" || { log "quickstart check: the query image was not found"; exit 1; }
  page=$(curl -fsS "http://127.0.0.1:$port/")
  grep -q "<title>imageindex search</title>" <<<"$page" || { log "quickstart check: no page"; exit 1; }
  log "quickstart check: ok"
else
  exec "${serve[@]}"
fi
