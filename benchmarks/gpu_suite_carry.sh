#!/usr/bin/env bash
# Pack what the GPU machine lacks for benchmarks/gpu_suite.py into .whl/ (git-ignored), small enough
# for the device tool's `carry` (64 MiB with the working tree):
#   - bitsandbytes (4-bit NF4): its manylinux wheel, unpacked into .whl/site/ with only the CUDA 13
#     and CPU libraries kept (the machine's torch is a CUDA 13 build; the whole wheel is 43 MB).
# The machine already has torch, transformers, peft, accelerate, tokenizers, pillow and numpy, and
# needs no RecBole (the suite does not import it).
#
#   bash benchmarks/gpu_suite_carry.sh [BITSANDBYTES_VERSION]      # default: the version installed here
# then run benchmarks/gpu_suite_device.sh there with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${1:-$("$PY" -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))' 2>/dev/null || echo 0.50.2)}
KEEP_CUDA=${KEEP_CUDA:-13}          # keep libbitsandbytes_cuda${KEEP_CUDA}*.so
DEST=.whl
git check-ignore -q "$DEST/" || { echo "gpu_suite_carry: $DEST/ is not git-ignored; add /$DEST/ to .gitignore" >&2; exit 1; }
rm -rf "$DEST/site" "$DEST/download"
mkdir -p "$DEST/site" "$DEST/download"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/download" "bitsandbytes==$VERSION"
wheel=$(ls "$DEST"/download/bitsandbytes-*.whl)
"$PY" - "$wheel" "$DEST/site" "$KEEP_CUDA" <<'PYEOF'
import re, sys, zipfile
wheel, dest, keep = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if not re.search(r"libbitsandbytes_(?!cpu|cuda%s)[a-z0-9]+\.(so|dll|dylib)$" % keep, n)]
    if not any(re.search(r"libbitsandbytes_cuda%s\d*\.so$" % keep, n) for n in names):
        sys.exit(f"gpu_suite_carry: {wheel} has no CUDA {keep} library; choose another version or KEEP_CUDA")
    z.extractall(dest, members=names)
PYEOF
rm -rf "$DEST/download"
du -sh "$DEST/site"
ls "$DEST"/site/bitsandbytes/*.so
