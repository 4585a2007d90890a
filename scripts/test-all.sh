#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian 12 host and runs every test tier,
# the real-VM tests included. Run as root from anywhere: sudo ./scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash images/build-images.sh
bash scripts/start-libvirt.sh
# Real-VM tests refuse to skip silently when this is set.
export VMHOST_REQUIRE_REAL_VM=1
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
cargo nextest run --no-fail-fast --profile ci "$@"
