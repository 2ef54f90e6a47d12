#!/usr/bin/env bash
# The release build: wheels that need no Rust to install, the source distribution, and the
# container image, all under dist/:
#   scripts/release.sh                 x86_64 and aarch64 wheels, sdist, image (as root)
#   scripts/release.sh --no-image      the same without the image (any user)
#   scripts/release.sh --host-only     only the x86_64 wheel and the image (what CI tests)
# Wheels are abi3 (CPython 3.11 and later) and manylinux2014 (glibc 2.17): maturin links
# through zig (the ziglang package from PyPI) against that glibc, whatever the build host's.
set -euo pipefail
cd "$(dirname "$0")/.."
image=1 arches="x86_64 aarch64"
for arg in "$@"; do
  case $arg in
    --no-image) image=0 ;;
    --host-only) arches=x86_64 ;;
    *) echo "release.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=$PWD/.venv/bin/python
"$python" -c 'import maturin, ziglang' 2>/dev/null \
  || "$python" -m pip install -q "maturin>=1.7,<2" "ziglang>=0.13,<0.14"
# maturin runs zig as `python3 -m ziglang`: the interpreter that has it must come first.
PATH="$(dirname "$python"):$PATH"
mkdir -p dist
rm -f dist/kproxy-*.whl
for arch in $arches; do
  target=$arch-unknown-linux-gnu
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    if ! rustup target add "$target" >/dev/null 2>&1; then
      echo "release.sh: cannot install Rust's $target (rustup target add $target): no $arch wheel" >&2
      [ -z "${CI:-}" ] || exit 1  # a release (CI) builds every architecture
      continue
    fi
  fi
  echo "release.sh: wheel for $arch"
  "$python" -m maturin build --quiet --release --zig --target "$target" \
    --compatibility manylinux2014 --out dist
done
"$python" -m maturin sdist --out dist 2>&1 | tail -n 1
ls -1 dist/kproxy-*
if [ "$image" = 1 ]; then
  wheel=$(ls dist/kproxy-*-manylinux*x86_64*.whl)
  PYTHON=$python scripts/image.sh "$wheel" dist
fi
