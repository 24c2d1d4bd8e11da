#!/usr/bin/env bash
# Prints the path of the ONNX model to use: $IMAGEINDEX_MODEL if set, else the seeded
# random-weight ResNet50 from hack/make-test-model.py, generated once into the cache.
source "$(dirname "$0")/lib.sh"
if [[ -n ${IMAGEINDEX_MODEL:-} ]]; then echo "$IMAGEINDEX_MODEL"; exit 0; fi
model=$CACHE/models/resnet50-random.onnx
if [[ ! -f $model ]]; then
  log "generating the test model (ResNet50 architecture, seeded random weights) -> $model"
  mkdir -p "$(dirname "$model")"
  "$PY" "$ROOT/hack/make-test-model.py" "$model" >&2
fi
echo "$model"
