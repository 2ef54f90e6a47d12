#!/usr/bin/env bash
# Quickstart 1: install kproxy and watch it balance traffic.
# Builds an isolated "node" out of network namespaces (three demo backend pods, a client pod
# and an external client, connected only to each other), runs `kproxy daemon` on the bundled
# manifests in examples/manifests, sends connections through a ClusterIP and a NodePort, and
# removes everything it created. Needs root for the namespaces and iptables.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the demo needs root: it creates network namespaces and iptables rules in them" >&2
  exit 1
fi
scripts/deps.sh run
echo "building and installing kproxy (first time: a minute or two)..."
scripts/venv.sh
exec .venv/bin/python examples/demo.py "$@"
