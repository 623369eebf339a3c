#!/usr/bin/env bash
# Make `lmconvert` importable where `pip install -e .` cannot run (no network for build dependencies):
# a symlink tree mirroring the package-dir layout. Prints the folder to put on PYTHONPATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
site=${1:-/tmp/lmconvert-site}
rm -rf "$site"
mkdir -p "$site/lmconvert"
for f in "$root"/lmconvert/*; do ln -s "$f" "$site/lmconvert/"; done
for sub in quant kernels runtime; do ln -s "$root/$sub/src" "$site/lmconvert/$sub"; done
ln -s "$root/calibration_data" "$site/lmconvert/calibration_data"
echo "$site"
