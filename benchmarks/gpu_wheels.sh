#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for benchmarks/gpu_check.sh: downloaded here into .whl/
# (ignored by git; carried to the device with carry [".whl"]). That machine has Python 3.12 with a
# CUDA torch 2.11 but no diffusers or xformers: xformers 0.0.35 is the release built for torch >= 2.10
# (0.0.33.post2, the CPU machines' pin, needs torch 2.9.1 exactly).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "xformers==${XFORMERS_VERSION:-0.0.35}" "diffusers==${DIFFUSERS_VERSION:-0.42.1}" \
  importlib_metadata
ls -la .whl
