#!/usr/bin/env bash
# Quickstart 2: install everything the tests need and run every gate CI runs.
# Privileged tests (network namespaces, real kernel rules) need root; as another user they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "system packages"
scripts/deps.sh test
step "python environment (.venv) with kproxy built in place"
scripts/venv.sh test
export PATH="$PWD/.venv/bin:$PATH"

step "rustfmt";  cargo fmt --all -- --check
step "clippy";   cargo clippy --all-targets -- -D warnings
                 cargo clippy --all-targets --no-default-features -- -D warnings
                 cargo clippy --lib --features mimalloc -- -D warnings
step "cargo test (core without libpython)"; cargo test --no-default-features
step "ruff";     ruff check . && ruff format --check .
step "mypy --strict"; mypy
step "stubtest _core.pyi"; python -m mypy.stubtest kproxy._core
step "release build: wheels, sdist and the image (tests/release installs and runs them)"
if [ "$(id -u)" = 0 ]; then scripts/release.sh; else scripts/release.sh --no-image; fi
step "pytest"
python -m pytest "$@"
