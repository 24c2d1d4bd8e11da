#!/usr/bin/env bash
# The fault matrix (tests/fault_matrix): the bucket misbehaving, Milvus and MariaDB SIGKILLed in
# the middle of a sync, hostile files, a wrong listing, races; each case ends with a consistency
# check and adds a row to the table this prints. It kills and restarts the local services, so it
# runs alone (hack/test.sh runs it with the rest: cargo runs test binaries one at a time).
#   hack/fault-matrix.sh            start the services, run the matrix, print the table
#   hack/fault-matrix.sh --print    print the table the last run left
source "$(dirname "$0")/lib.sh"
table=$STATE/artifacts/fault-matrix.txt
if [[ ${1:-} != --print ]]; then
  "$ROOT/hack/install.sh"
  "$ROOT/hack/services.sh" up
  model=$("$ROOT/hack/model.sh")
  source "$STATE/env"
  export IMAGEINDEX_MODEL=$model
  rm -f "$table"
  (cd "$ROOT" && cargo test --locked --test fault_matrix -- "$@")
fi
[[ -f $table ]] || { log "no fault matrix in $table"; exit 0; }
log "fault matrix (peak RSS of the test process during the case):"
{
  echo "| case | expected | indexed | failed (with reason) | lost | duplicated | orphan vectors | peak RSS MiB |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  cat "$table"
} >&2
