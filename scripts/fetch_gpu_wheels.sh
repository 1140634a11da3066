#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks (it has torch, pytest, hypothesis,
# tqdm, matplotlib, ninja, but no network) into .whl/, for scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  higher==0.2.1 torchmeta==1.8.0 ordered-set expecttest packaging h5py
ls .whl
