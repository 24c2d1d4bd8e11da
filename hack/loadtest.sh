#!/usr/bin/env bash
# Load test of /img/search (a script, not a test): wrk on loopback at concurrency 1, 8 and 32 for
# a bounded time each, with a multipart query image, against the server with micro-batching (the
# default: up to 8 queries per model call) and without (--max-batch 1), in one run, with the
# default queue (2 x cores embedding at once, 32 waiting, 5 s), and without the queue. Prints p50/p99 latency,
# requests/s, the status counts (503 = the queue was full or its wait ran out) and the server's
# peak RSS; then the same query against the bare embedding (decode + preprocess + model, no HTTP,
# no Milvus) for comparison.
#   DURATION=15s hack/loadtest.sh
# COLLECTION=name searches a collection that is already filled (hack/bench-search-scale.sh)
# instead of indexing the sample images; SETTINGS picks the runs ("max-batch queue,...").
source "$(dirname "$0")/lib.sh"
command -v wrk >/dev/null || { sudo_=""; [[ $(id -u) == 0 ]] || sudo_=sudo; DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq wrk >/dev/null; }
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
source "$STATE/env"
export IMAGEINDEX_MODEL=${IMAGEINDEX_MODEL:-$("$ROOT/hack/model.sh")} IMAGEINDEX_COLLECTION=${COLLECTION:-loadtest} RUST_LOG=warn
(cd "$ROOT" && cargo build --locked --release --quiet --bin imageindex)
bin=$CARGO_TARGET_DIR/release/imageindex
samples=$STATE/samples
[[ -d $samples ]] || "$PY" "$ROOT/hack/make-sample-images.py" "$samples"
[[ -n ${COLLECTION:-} ]] || "$bin" index "$samples" >/dev/null

port=18081

# wrk sends one fixed multipart body; its Lua script also tallies the statuses.
query=$(find "$samples" -name '*.jpg' | sort | sed -n 1p) # sed reads all: no SIGPIPE under pipefail
lua=$STATE/loadtest.lua
"$PY" - "$query" "$lua" <<'PYEOF'
import sys
img = open(sys.argv[1], "rb").read()
b = "imageindexloadtestboundary"
body = (f"--{b}\r\nContent-Disposition: form-data; name=\"topk\"\r\n\r\n10\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode("latin-1") \
       + img + f"\r\n--{b}--\r\n".encode("latin-1")
esc = "".join(f"\\{c}" for c in body)
open(sys.argv[2], "w").write(f'''
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={b}"
wrk.body = "{esc}"
local counts = {{}}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {{}}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do total[k] = (total[k] or 0) + v end
  end
  local parts = {{}}
  for k, v in pairs(total) do table.insert(parts, k .. ": " .. v) end
  io.write(string.format("p50 %.1f ms  p99 %.1f ms  %.2f req/s  statuses {{%s}}\\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.requests / (summary.duration / 1e6),
    table.concat(parts, ", ")))
end
''')
PYEOF
# Batching and the queue (the defaults), batching off, then no queue (the old behaviour: 503 at
# once beyond 2 x cores; wrk sends the next request at once, so it counts the 503s it got).
IFS=, read -r -a settings <<<"${SETTINGS:-8 32,1 32,8 0}"
for setting in "${settings[@]}"; do
  read -r batch queue <<<"$setting"
  "$bin" serve --listen "127.0.0.1:$port" --source "$samples" --max-batch "$batch" --max-queued-embeddings "$queue" &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
  wait_for "search server" 60 curl -fsS "http://127.0.0.1:$port/readyz"
  for c in 1 8 32; do
    printf 'max-batch %s, queue %2s, concurrency %2s, %s: ' "$batch" "$queue" "$c" "${DURATION:-15s}"
    wrk -t"$((c < 2 ? 1 : 2))" -c"$c" -d"${DURATION:-15s}" --timeout 30s -s "$lua" "http://127.0.0.1:$port/img/search" | tail -n1
  done
  calls=$(curl -fsS "http://127.0.0.1:$port/metrics" | awk '$1 == "imageindex_embed_batch_size_count" {print $2}')
  queries=$(curl -fsS "http://127.0.0.1:$port/metrics" | awk '$1 == "imageindex_embed_batch_size_sum" {print $2}')
  echo "max-batch $batch, queue $queue: $queries queries in $calls model calls; server peak RSS $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$pid/status)"
  kill $pid; wait $pid 2>/dev/null; trap - EXIT
done
# The bare embedding of the same query: no HTTP, no Milvus.
(cd "$ROOT" && QUERY=$query cargo bench --locked --bench throughput -- --embed-only 2>/dev/null | tail -n1)
