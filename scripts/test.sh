#!/usr/bin/env bash
# castor's whole test suite: formatting, lints, then unit, property and
# end-to-end tests on this machine's real KVM. Heavy benchmarks are not run
# here (see benchmarks/). Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need gcc || ! need ld || ! need objcopy; then
    echo "installing gcc and binutils (castor's guest is built from source)"
    apt-get update -qq && apt-get install -y -qq gcc binutils
fi
if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing: castor's tests run real KVM guests" >&2
    exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace --doc -q
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    echo "cargo-nextest not found: using cargo test (KVM tests one at a time)"
    cargo test --workspace -- --test-threads=1
fi
