#!/usr/bin/env bash
# Prints the path of the ONNX model to use: $IMAGEINDEX_MODEL if set, else the seeded
# random-weight ResNet50 from hack/make-test-model.py, generated once into the cache.
#   --variants: also make its fp16 and int8 variants beside it (hack/quantize.py; int8 calibrated
#   on 256 photos from hack/make-photos.py), as `imageindex --precision` expects to find them.
#   --resnet18: the seeded random-weight ResNet18 instead (512-d vectors, not 2048): a second
#   model of another width, for changing the model under a live index.
source "$(dirname "$0")/lib.sh"
if [[ ${1:-} == --resnet18 ]]; then
  model=$CACHE/models/resnet18-random.onnx
  if [[ ! -f $model ]]; then
    log "generating the second test model (ResNet18 architecture, seeded random weights) -> $model"
    mkdir -p "$(dirname "$model")"
    "$PY" "$ROOT/hack/make-test-model.py" "$model" --arch resnet18 --seed 18 >&2
  fi
  echo "$model"
  exit 0
fi
model=${IMAGEINDEX_MODEL:-$CACHE/models/resnet50-random.onnx}
if [[ ! -f $model ]]; then
  [[ -n ${IMAGEINDEX_MODEL:-} ]] && { log "IMAGEINDEX_MODEL=$model does not exist"; exit 1; }
  log "generating the test model (ResNet50 architecture, seeded random weights) -> $model"
  mkdir -p "$(dirname "$model")"
  "$PY" "$ROOT/hack/make-test-model.py" "$model" >&2
fi
if [[ ${1:-} == --variants ]]; then
  # 64 photos left int8 0.1 point short of the parity target on an AVX-512 VNNI CPU (98.9% top-1
  # against fp32's 100%); 256 calibrate its activation ranges well enough on AVX2 and VNNI alike.
  calibration=$CACHE/photos/calibration-256
  [[ -d $calibration/photos ]] || "$PY" "$ROOT/hack/make-photos.py" "$calibration" --count 256 --seed 99 >&2
  for p in fp16 int8; do
    variant=${model%.onnx}.$p.onnx
    # The calibration set is part of what made the int8 file: a new set makes a new file.
    if [[ ! -f $variant || $model -nt $variant || ($p == int8 && $calibration -nt $variant) ]]; then
      log "making the $p variant -> $variant"
      "$PY" "$ROOT/hack/quantize.py" "$model" --precision $p --calibration "$calibration" --count 256 \
        -o "$variant" >&2
    fi
  done
fi
echo "$model"
