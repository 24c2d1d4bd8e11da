#!/usr/bin/env bash
# Search at a large collection (issue 14): for each size in SIZES, a collection of that many
# vectors (the parity photos' embeddings plus distractors made from them; filled and indexed once,
# then kept in Milvus) searched with the API's settings: Milvus alone at concurrency 1, 8 and 32,
# recall@10 against an exact search, how often an edited photo finds its original first
# (benches/search_scale.rs); Milvus's memory; then /img/search end to end on the same collection
# (hack/loadtest.sh, micro-batching and queue at their defaults).
#   SIZES="100000" DURATION=15s hack/bench-search-scale.sh     (100k: ~0.8 GB of vectors, minutes to index)
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
source "$STATE/env"
cd "$ROOT"
photos=$CACHE/photos/parity-1000
[[ -d $photos/queries ]] || "$PY" "$ROOT/hack/make-photos.py" "$photos" --count 1000 --queries >&2
export PHOTOS=$photos IMAGEINDEX_MODEL=${IMAGEINDEX_MODEL:-$("$ROOT/hack/model.sh")}
milvus_memory() {
  local pid; pid=$(running_pid milvus)
  awk '/VmRSS|VmHWM/ {printf "%s %.0f MiB  ", $1, $2/1024} END {print ""}' "/proc/$pid/status"
}
for n in ${SIZES:-100000}; do
  log "search at $n vectors: Milvus alone"
  cargo bench --locked --quiet --bench search_scale -- "$n"
  echo "$n vectors: Milvus (the server process) $(milvus_memory)"
  log "search at $n vectors: /img/search end to end"
  # The collection is claimed by the benchmark's owner name; the server searches it as that owner.
  COLLECTION=search_scale_$n SETTINGS="8 32" IMAGEINDEX_OWNER=search-scale-bench "$ROOT/hack/loadtest.sh"
done
