#!/usr/bin/env bash
# NATTEN for the GPU machine, which has no package index: the pure-Python package of NATTEN's source
# distribution on PyPI, put into .carry/site (ignored by git) for the device tool's `carry`; there, put
# .carry/site on PYTHONPATH. libnatten (NATTEN's CUTLASS and Hopper kernels) is not built, so NATTEN runs its
# Flex backend there (its Hopper kernels do not take head dim 16 anyway). Run it with the project's Python
# (the sdist's metadata step imports torch): `. .venv/bin/activate && scripts/carry_natten.sh [VERSION]`.
set -euo pipefail
version="${1:-0.21.7}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
site="$repo/.carry/site"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "natten==$version" -d "$work"
tar -xzf "$work/natten-$version.tar.gz" -C "$work"
rm -rf "$site/natten" "$site"/natten-*.dist-info
mkdir -p "$site/natten-$version.dist-info"
cp -r "$work/natten-$version/src/natten" "$site/natten"
# importlib.metadata.version("natten"), which the rows' natten field reads
printf 'Metadata-Version: 2.1\nName: natten\nVersion: %s\n' "$version" > "$site/natten-$version.dist-info/METADATA"
if find "$site/natten" -name '*.so' | grep -q .; then
  echo "carry_natten: natten $version holds compiled files; expected pure Python" >&2
  exit 1
fi
echo "carry_natten: natten $version (pure Python, no libnatten) in $site: $(du -sh "$site" | cut -f1)"
