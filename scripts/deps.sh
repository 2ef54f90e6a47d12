#!/usr/bin/env bash
# Installs the system packages kproxy needs (Debian/Ubuntu), only those that are missing.
#   scripts/deps.sh run    what running the daemon and the demo needs
#   scripts/deps.sh test   that, plus what the test suite needs
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip || need+=(iproute2)
have iptables-restore || need+=(iptables)
have nft || need+=(nftables)
if [ "${1:-run}" = test ]; then
  have flock || need+=(util-linux)
  have ipset || need+=(ipset)
  have conntrack || need+=(conntrack)
  # The ipvs tier: a VM with Debian's kernel under qemu (tests/vm/), which virtme-ng boots.
  have qemu-system-x86_64 || need+=(qemu-system-x86)
  ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
  dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
  have ipvsadm || need+=(ipvsadm)
  # The userspace forwarding benchmark's baselines and load (its smoke run is a test).
  have iperf3 || need+=(iperf3)
  have haproxy || need+=(haproxy)
  have socat || need+=(socat)
  # The image tier: a root filesystem from Debian's packages, packed as an OCI image and run
  # with crun (scripts/image.sh, tests/privileged/test_image.py).
  have mmdebstrap || need+=(mmdebstrap)
  have umoci || need+=(umoci)
  have crun || need+=(crun)
fi
have cargo || need+=(cargo rustc)
have cc || need+=(gcc)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Building the core needs the Rust that Cargo.toml names (Debian 12's own rustc is 1.63).
want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml")
got=$(rustc --version 2>/dev/null | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$want" "$got" | sort -V | head -n1)" != "$want" ]; then
  echo "kproxy's core needs Rust $want or newer to build; this machine has rustc ${got:-none}." >&2
  echo "Install a current toolchain with rustup (https://rustup.rs), or install a prebuilt" >&2
  echo "kproxy wheel, which needs no Rust (scripts/release.sh builds them)." >&2
  exit 1
fi
