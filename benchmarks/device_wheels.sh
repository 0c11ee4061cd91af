#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (its image has torch, accelerate, huggingface_hub, torchmetrics, ...; not
# diffusers, datasets, nilearn, umap-learn and their few own needs), for its Python 3.12, into .whl/ (git-ignored).
# Run from the repo root on this machine; each device call then carries .whl and starts with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
# The versions are those the test suite ran with on 2026-11-26 (about 22 MB in all).
set -euo pipefail
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 datasets==5.2.0 nilearn==0.14.1 nibabel==5.4.2 umap-learn==0.5.12 pynndescent==0.7.0 \
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
ls .whl
