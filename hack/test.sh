#!/usr/bin/env bash
# The test command: installs what is missing, starts the local services, makes the test model,
# and runs every test: unit tests, end-to-end tests on the real services, and the operator on a
# real kube-apiserver (built once into the cache by hack/kube-build.sh, about 12 minutes), then
# the chart on a real single-node cluster.
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
"$ROOT/hack/kube.sh" up
model=$("$ROOT/hack/model.sh" --variants)
# Photos with near-duplicate queries for the precision parity test.
parity=$CACHE/photos/parity-1000
[[ -d $parity/queries ]] || "$PY" "$ROOT/hack/make-photos.py" "$parity" --count 1000 --queries >&2
source "$STATE/env"
source "$STATE/kube.env"
resnet18=$("$ROOT/hack/model.sh" --resnet18)
export IMAGEINDEX_MODEL=$model IMAGEINDEX_PARITY_PHOTOS=$parity IMAGEINDEX_MODEL_RESNET18=$resnet18
cd "$ROOT"
rm -f "$STATE/artifacts/parity.txt" "$STATE/artifacts/cuda.txt" "$STATE/artifacts/fault-matrix.txt" \
  "$STATE/artifacts/loadtest-hostile.txt"
cargo test --locked "$@"
"$ROOT/hack/fault-matrix.sh" --print
# What the passing tests measured or skipped (cargo captures their output).
for f in parity.txt cuda.txt; do
  if [[ -f $STATE/artifacts/$f ]]; then log "$f:"; cat "$STATE/artifacts/$f" >&2; fi
done
# 2,000 idle connections and 200 slow bodies: probes and searches must still answer (their
# latencies are printed beside the same requests on an idle server, never judged).
"$ROOT/hack/loadtest-hostile.sh" --check
"$ROOT/hack/browser-test.sh"
# The operator as a cluster runs it: the chart on a real single-node Kubernetes (hack/cluster.sh).
"$ROOT/hack/cluster-e2e.sh"
