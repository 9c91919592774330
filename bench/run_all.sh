#!/usr/bin/env bash
# Re-measure every figure in BENCHMARKS.md, one JSON per bench under ${OUT:-bench-results}/.
# Run on a quiet machine: wall-clock figures (efficiency, speedups) depend on other load; every
# JSON carries the machine stamp, including the 1-minute load average when it was written.
# `make bench` runs this; QUICK=1 skips the slow ones (0.5B-shaped prefix model; overhead at
# 2,000 questions instead of 10,000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
mics() { HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" -m cli.app "$@"; }

mics bench loop --questions 200 --cap 16 --json "$OUT/loop.json"
mics bench loop --questions 200 --cap 16 --preset fast --json "$OUT/loop-fast.json"
mics bench loop --questions 200 --cap 64 --preset fast --sharded-questions 64 \
    --json "$OUT/loop-fast-cap64.json"
# The same two with aiohttp for every endpoint (what https:// endpoints get), to compare clients.
MICS_HTTP_CLIENT=aiohttp mics bench loop --questions 200 --cap 16 --preset fast \
    --json "$OUT/loop-fast-aiohttp.json"
MICS_HTTP_CLIENT=aiohttp mics bench loop --questions 200 --cap 64 --preset fast \
    --sharded-questions 64 --json "$OUT/loop-fast-cap64-aiohttp.json"
"$PY" -m bench.http_clients --json "$OUT/http-clients.json"
mics bench parts --json "$OUT/parts.json"
mics bench images --images 2000 --concurrency 64 --json "$OUT/images.json"
if [[ "${QUICK:-0}" == 1 ]]; then
    mics bench prefix --models tiny --json "$OUT/prefix.json"
    mics bench prefix --models tiny --temperatures 1.2 --json "$OUT/prefix-1t.json"
    mics bench overhead --questions 2000 --json "$OUT/overhead.json"
else
    mics bench prefix --json "$OUT/prefix.json"
    mics bench prefix --temperatures 1.2 --json "$OUT/prefix-1t.json"
    mics bench overhead --questions 10000 --json "$OUT/overhead.json"
fi
mics bench resume --nodes 10000 --json "$OUT/resume.json"
mics bench resume --finished 100000 --json "$OUT/resume-finished.json"
echo "figures in $OUT/"
