#!/usr/bin/env bash
# Browser test of the search page: Debian's Chromium driven by playwright-core (npm), against a
# real `imageindex serve` over sample images indexed into their own collection. Screenshot under
# .state/artifacts/. Called by hack/test.sh; needs the services up and the binary built.
source "$(dirname "$0")/lib.sh"
if ! command -v chromium >/dev/null; then
  log "apt-get install chromium"
  sudo_=""; [[ $(id -u) == 0 ]] || sudo_=sudo
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
NODE_DIR=$CACHE/node
if [[ ! -d $NODE_DIR/node_modules/playwright-core ]]; then
  log "npm install playwright-core"
  mkdir -p "$NODE_DIR" && (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund playwright-core@1.64 >/dev/null)
fi
source "$STATE/env"
export IMAGEINDEX_MODEL=${IMAGEINDEX_MODEL:-$("$ROOT/hack/model.sh")} IMAGEINDEX_COLLECTION=browser_test
bin=$CARGO_TARGET_DIR/debug/imageindex
samples=$STATE/browser-samples
[[ -d $samples ]] || "$PY" "$ROOT/hack/make-sample-images.py" "$samples" --count 40 >/dev/null
"$bin" index "$samples" >/dev/null

# The query: one sample re-encoded at another quality and 92% of its size.
original=scenes/sample-003.jpg
query=$STATE/browser-query.jpg
"$PY" -c "
from PIL import Image; import sys
im = Image.open(sys.argv[1]); im.resize((im.width * 92 // 100, im.height * 92 // 100)).save(sys.argv[2], quality=70)
" "$samples/$original" "$query"

port=18080
"$bin" serve --listen "127.0.0.1:$port" --source "$samples" 2>"$STATE/browser-serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
wait_for "search server" 60 curl -fsS "http://127.0.0.1:$port/readyz"
mkdir -p "$STATE/artifacts"
BASE_URL=http://127.0.0.1:$port/ QUERY_IMAGE=$query EXPECTED_KEY=$original SCREENSHOT=$STATE/artifacts/search-page.png \
  NODE_PATH=$NODE_DIR/node_modules node "$ROOT/e2e/browser/search-page.cjs"
