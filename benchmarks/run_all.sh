#!/usr/bin/env bash
# Every number in benchmarks/PERFORMANCE.md, in one go (about 2 minutes on a 2-core machine).
# Outputs go to benchmarks/results/ (bench.txt/json, memory.txt, train_full_*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/results
uptime | tee benchmarks/results/load.txt
$PY -m handgrad bench --threads 1 --json > benchmarks/results/bench.json
$PY -c "import json,sys; from handgrad.bench import BenchResult, Row; d=json.load(open('benchmarks/results/bench.json')); \
r=BenchResult(d['config'], [Row(**x) for x in d['rows']], [Row(**x) for x in d['large']], d['large_batch'], d['machine']); \
print(r.table())" | tee benchmarks/results/bench.txt
$PY benchmarks/memory.py --batch 65536 --steps 5 --tile 1024 | tee benchmarks/results/memory.txt
$PY benchmarks/memory.py --batch 4096 --steps 50 --tile 1024 | tee benchmarks/results/memory_4096.txt
$PY benchmarks/train_full.py --engine fast | tee benchmarks/results/train_full_fast.json
$PY benchmarks/train_full.py --engine eager | tee benchmarks/results/train_full_eager.json
$PY benchmarks/gradcheck_side_by_side.py --repeat 3 --out benchmarks/results/gradcheck_side_by_side.md > /dev/null
$PY benchmarks/dojo_timing.py --repeat 3 | tee benchmarks/results/dojo_timing.txt
$PY benchmarks/dojo_class.py | tee benchmarks/results/dojo_class.txt
