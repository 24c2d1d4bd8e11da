#!/usr/bin/env bash
# Throughput benchmark (not a test): bare model vs end-to-end indexing, one run, side by side.
#   IMAGES=300 BATCHES="1 16" hack/bench.sh
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
model=$("$ROOT/hack/model.sh")
source "$STATE/env"
export IMAGEINDEX_MODEL=$model RUST_LOG=${RUST_LOG:-warn}
cd "$ROOT"
cargo bench --locked --bench throughput
