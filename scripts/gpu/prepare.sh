#!/usr/bin/env bash
# Before a GPU call, on the CPU machine: put what the GPU machine lacks (it has torch 2.11,
# pytest, hypothesis, tqdm, matplotlib, ninja, h5py and no network) into the git-ignored
# .whl/ (pure-Python wheels for its Python 3.12) and .gpu-data/ (Omniglot as one npz), the
# two folders to `carry` (scripts/gpu/check.sh and scripts/gpu/train.sh read them).
#
# usage: scripts/gpu/prepare.sh OMNIGLOT_DIR   (a folder holding omniglot_28x28.npz)
set -euo pipefail
if [[ $# -ne 1 || ! -f "$1/omniglot_28x28.npz" ]]; then
  echo "usage: $0 OMNIGLOT_DIR (a folder holding omniglot_28x28.npz)" >&2
  exit 2
fi
DATA=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl .gpu-data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  higher==0.2.1 torchmeta==1.8.0 ordered-set expecttest
cp "$DATA/omniglot_28x28.npz" .gpu-data/
ls -la .whl .gpu-data
