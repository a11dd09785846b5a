#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the Triton kernel under TRITON_INTERPRET=1 included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest --benchmark-disable "$@"
