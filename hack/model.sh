#!/usr/bin/env bash
# Prints the path of the ONNX model to use: $IMAGEINDEX_MODEL if set, else the seeded
# random-weight ResNet50 from hack/make-test-model.py, generated once into the cache.
#   --variants: also make its fp16 and int8 variants beside it (hack/quantize.py; int8 calibrated
#   on 64 photos from hack/make-photos.py), as `imageindex --precision` expects to find them.
source "$(dirname "$0")/lib.sh"
model=${IMAGEINDEX_MODEL:-$CACHE/models/resnet50-random.onnx}
if [[ ! -f $model ]]; then
  [[ -n ${IMAGEINDEX_MODEL:-} ]] && { log "IMAGEINDEX_MODEL=$model does not exist"; exit 1; }
  log "generating the test model (ResNet50 architecture, seeded random weights) -> $model"
  mkdir -p "$(dirname "$model")"
  "$PY" "$ROOT/hack/make-test-model.py" "$model" >&2
fi
if [[ ${1:-} == --variants ]]; then
  calibration=$CACHE/photos/calibration
  [[ -d $calibration/photos ]] || "$PY" "$ROOT/hack/make-photos.py" "$calibration" --count 64 --seed 99 >&2
  for p in fp16 int8; do
    variant=${model%.onnx}.$p.onnx
    if [[ ! -f $variant || $model -nt $variant ]]; then
      log "making the $p variant -> $variant"
      "$PY" "$ROOT/hack/quantize.py" "$model" --precision $p --calibration "$calibration" -o "$variant" >&2
    fi
  done
fi
echo "$model"
