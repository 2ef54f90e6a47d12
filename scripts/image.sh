#!/usr/bin/env bash
# Builds kproxy's container image from Debian's packages, with no registry and no Docker:
#   scripts/image.sh WHEEL [OUT]
# WHEEL is a kproxy wheel (scripts/release.sh builds one); OUT defaults to dist/. Writes
#   OUT/oci/                          an OCI image layout, tagged <version> and latest
#   OUT/kproxy-image-<version>.tar    the same layout as one archive (podman load, ctr import,
#                                     skopeo copy oci-archive:...)
#   OUT/kproxy-image-<version>.digest the image manifest's digest
# The root filesystem is Debian bookworm (deploy/image/packages.txt) made by mmdebstrap, with
# kproxy and its Python dependencies in a venv at /opt/kproxy; umoci packs it as one layer.
# KPROXY_DEBIAN_MIRROR overrides the mirror (default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=${1:?usage: scripts/image.sh WHEEL [OUT]}
out=${2:-dist}
for tool in mmdebstrap umoci; do
  command -v "$tool" >/dev/null || { echo "image.sh: $tool is missing (scripts/deps.sh test)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "image.sh: needs root (mmdebstrap's root mode)" >&2; exit 1; }
version=$(basename "$wheel" | cut -d- -f2)
mirror=${KPROXY_DEBIAN_MIRROR:-http://deb.debian.org}
python=${PYTHON:-python3}
packages=$(grep -v '^\s*#' deploy/image/packages.txt | xargs | tr ' ' ,)
# File times in the layer and the archive are the commit's, not the build's.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# kproxy's Python dependencies as wheels, fetched here (the root filesystem has no network
# of its own in every build setup) for the image's Python, Debian's 3.11.
mkdir "$work/wheels"
cp "$wheel" "$work/wheels/"
"$python" -m pip download -q --only-binary=:all: --python-version 3.11 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$work/wheels" "$wheel"

echo "image.sh: root filesystem (Debian bookworm: $packages)"
mmdebstrap --quiet --mode=root --variant=essential --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook="copy-in $work/wheels /tmp" \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin python3 -m venv /opt/kproxy' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/kproxy/bin/pip install -q --no-index --no-cache-dir --no-compile --find-links /tmp/wheels kproxy' \
  --customize-hook='ln -s /opt/kproxy/bin/kproxy "$1/usr/local/bin/kproxy"' \
  --customize-hook='ln -s /opt/kproxy/bin/kube-proxy "$1/usr/local/bin/kube-proxy"' \
  --customize-hook='rm -rf "$1/tmp/wheels" "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
  bookworm "$work/rootfs.tar" \
  "deb $mirror/debian bookworm main" \
  "deb $mirror/debian bookworm-updates main" \
  "deb $mirror/debian-security bookworm-security main"

echo "image.sh: OCI image kproxy:$version"
rm -rf "$out/oci"
mkdir -p "$out"
layout="$out/oci"
umoci init --layout "$layout"
umoci new --image "$layout:$version"
umoci raw add-layer --image "$layout:$version" "$work/rootfs.tar"
# KPROXY_IPTABLES_BACKEND=auto: the image uses whichever iptables (legacy or nft) the host's
# kubelet and CNI use (python/kproxy/xtables_backend.py), as upstream's iptables-wrapper.
umoci config --image "$layout:$version" --os linux --architecture amd64 \
  --author "kproxy" \
  --config.env "PATH=/opt/kproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.env "KPROXY_IPTABLES_BACKEND=auto" \
  --config.cmd kproxy --config.cmd daemon \
  --config.label "org.opencontainers.image.title=kproxy" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.licenses=Apache-2.0" \
  --config.label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
umoci tag --image "$layout:$version" latest
umoci gc --layout "$layout"
archive="$out/kproxy-image-$version.tar"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 -C "$layout" -cf "$archive" .
digest=$("$python" -c '
import json, sys
index = json.load(open(sys.argv[1]))
tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
print(tags[sys.argv[2]])' "$layout/index.json" "$version")
echo "$digest" > "$out/kproxy-image-$version.digest"
echo "image.sh: $archive ($(du -h "$archive" | cut -f1)), $digest"
