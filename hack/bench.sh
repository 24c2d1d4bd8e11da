#!/usr/bin/env bash
# Throughput benchmark (not a test): every stage of embedding measured in one run, side by side.
#   hack/bench.sh                                   fp32 on the CPU, 200 photos of 500x375
#   PRECISION=int8 hack/bench.sh                    int8, with bare fp32 as the baseline
#   DEVICE=cuda PRECISION=fp16 IMAGES=5000 BARE_BATCHES="64 256" BATCHES=256 hack/bench.sh
# Also: BATCHES (end to end, default 16), BARE_BATCHES (default "1 16 64 256"), ROUNDS (3),
# SIZE (photo size, 500x375), LARGE_SIZE (1600x1200, for exact vs --fast-jpeg; LARGE_SIZE= skips).
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
model=$("$ROOT/hack/model.sh" --variants)
source "$STATE/env"
images=${IMAGES:-200} size=${SIZE:-500x375} large_size=${LARGE_SIZE-1600x1200}
photos=$CACHE/photos/bench-$images-$size
[[ -d $photos/photos ]] || "$PY" "$ROOT/hack/make-photos.py" "$photos" --count "$images" --size "$size" --seed 5 >&2
export PHOTOS=$photos
if [[ -n $large_size ]]; then
  large=$CACHE/photos/large-50-$large_size
  [[ -d $large/photos ]] || "$PY" "$ROOT/hack/make-photos.py" "$large" --count 50 --size "$large_size" --seed 6 >&2
  export LARGE=$large/photos
fi
export IMAGEINDEX_MODEL=$model RUST_LOG=${RUST_LOG:-warn} DEVICE=${DEVICE:-cpu} PRECISION=${PRECISION:-fp32}
cd "$ROOT"
cargo bench --locked --bench throughput
