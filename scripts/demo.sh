#!/usr/bin/env bash
# castor's main job: a local HA pair with an etcd witness, a failover, and
# its report. Installs what it needs on a fresh machine. Extra arguments go
# to `castor demo` (see `castor demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
exec cargo run --release -q -- demo "$@"
