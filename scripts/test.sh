#!/usr/bin/env bash
# castor's whole test suite: formatting, lints, then unit, property and
# end-to-end tests on this machine's real KVM. Heavy benchmarks are not run
# here (see benchmarks/). Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

source scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace --doc -q
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    echo "cargo-nextest not found: using cargo test (KVM tests one at a time)"
    cargo test --workspace -- --test-threads=1
fi
