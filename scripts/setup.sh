#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch 2.13.0
# (installed first and explicitly, so no dependency pulls a CUDA build), then this project with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,asv,triton,natten,distributed]"
