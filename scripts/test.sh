#!/usr/bin/env bash
# The project's test command (the README names it; CI runs it on a clean clone):
# installs the test peers, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Test what this checkout builds: a binary left in the environment must not stand in for it.
unset OUTPOST_BIN OUTPOST_ARM_BIN
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo test --workspace --locked
