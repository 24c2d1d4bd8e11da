#!/usr/bin/env bash
# The test command: installs what is missing, starts the local services, makes the test model,
# and runs every test (unit tests and the end-to-end tests on the real services).
source "$(dirname "$0")/lib.sh"
"$ROOT/hack/install.sh"
"$ROOT/hack/services.sh" up
model=$("$ROOT/hack/model.sh")
source "$STATE/env"
export IMAGEINDEX_MODEL=$model
cd "$ROOT"
cargo test --locked "$@"
"$ROOT/hack/browser-test.sh"
