#!/usr/bin/env bash
# The main job: set up (if needed), measure this CPU's peak (its physical FMA rate, with sgemm and conv rates
# beside it, for the fraction-of-peak columns), run the default sweep (preset `quick`) on this machine, resuming
# where an earlier run stopped, then regenerate reports/ from everything under results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sasa-bench peak
sasa-bench run --suite quick --resume "$@"
sasa-bench report
