#!/usr/bin/env bash
# Quickstart 1: install kproxy and watch it balance traffic.
#
# As root: builds an isolated "node" out of network namespaces (three demo backend pods, a
# client pod and an external client, connected only to each other), runs `kproxy daemon` on
# the bundled manifests in examples/manifests, sends connections through a ClusterIP and a
# NodePort, and removes everything it created.
#
# As any other user (or with --userspace): no privileges at all. The userspace mode serves a
# NodePort on 127.0.0.1 and relays to three backends on loopback (examples/demo_userspace.py).
# Needs python3 (3.11+) with venv, and a Rust toolchain (cargo) to build the core.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || [ "${1:-}" = --userspace ]; then
  for tool in python3 cargo; do
    if ! command -v "$tool" >/dev/null; then
      echo "the rootless demo needs $tool on PATH (as root, scripts/deps.sh installs it)" >&2
      exit 1
    fi
  done
  echo "building and installing kproxy (first time: a minute or two)..."
  scripts/venv.sh
  exec .venv/bin/python examples/demo_userspace.py
fi
scripts/deps.sh run
echo "building and installing kproxy (first time: a minute or two)..."
scripts/venv.sh
exec .venv/bin/python examples/demo.py "$@"
