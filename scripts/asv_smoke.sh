#!/usr/bin/env bash
# CI smoke of the asv suite: every benchmark runs once (--quick) against the working tree in the current
# environment (--python=same, no build) and must give a result; a failed benchmark fails this script.
# Skips (an implementation missing or unavailable here: NaN in asv's results) are fine; a failure (null) is not.
# The quick timings are meaningless, so they go to a throwaway results folder, never to results/asv.
# Extra arguments go to asv run (e.g. --bench REGEX).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# asv.conf.json with results and html under $tmp; asv runs in its config's folder, so the paths become
# absolute (and the config is read the way asv reads it: with // comments)
python - "$tmp" <<'EOF'
import json, os, sys
from asv import util

conf = util.load_json("asv.conf.json", js_comments=True)
conf.update({key: os.path.abspath(conf[key]) for key in ("repo", "benchmark_dir", "env_dir")})
conf.update(results_dir=f"{sys.argv[1]}/results", html_dir=f"{sys.argv[1]}/html")
with open(f"{sys.argv[1]}/asv.conf.json", "w") as out:
    json.dump(conf, out)
EOF

asv machine --yes --machine asv-smoke >/dev/null
# forkserver: the CPU-only CI imports torch once instead of once per benchmark and parameter set
# (spawn, the config's choice for GPUs, costs about 2 s each here); ASV_PYTHONPATH: the working tree's code.
status=0
ASV_PYTHONPATH="$PWD" asv run --config "$tmp/asv.conf.json" --machine asv-smoke --python=same --quick \
    --launch-method forkserver --set-commit-hash "$(git rev-parse HEAD)" --show-stderr "$@" || status=$?

python - "$tmp/results" <<'EOF'
import glob, json, sys

files = [f for f in glob.glob(f"{sys.argv[1]}/*/*.json") if not f.endswith(("machine.json", "benchmarks.json"))]
if not files:
    sys.exit("asv smoke: asv wrote no results")
failed, total = [], 0
for path in files:
    with open(path) as stream:
        data = json.load(stream)
    column = data["result_columns"].index("result")
    for name, row in data["results"].items():
        values = row[column] if isinstance(row[column], list) else [row[column]]
        total += len(values)
        if any(value is None for value in values):
            failed.append(name)
print(f"asv smoke: {total} results, {len(failed)} benchmarks with failures: {', '.join(failed) or 'none'}")
sys.exit(1 if failed else 0)
EOF
exit "$status"
