#!/usr/bin/env bash
# The full-size path on this machine, each step under /usr/bin/time -v: a random 7B checkpoint
# in the published layout, its float32 ONNX export (validated on a subset), ort-int4 and ort-int8
# quantization, scoring the real photographs with each, and the bf16 graphs a TensorRT build
# reads. Prints one line per step: peak resident memory and wall time (docs/full-size.md).
# Needs about 80 GB of free disk in WORK (the float32 export, 31 GB, is removed at the end).
#   bash benchmarks/full_size.sh [WORK]    (default: ./full-size)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-full-size}
examples=${EXAMPLES:-../shared/fixtures/editreward_examples}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
step() {  # step NAME COMMAND...: run under /usr/bin/time -v, keep its output and the two numbers
  local name=$1; shift
  /usr/bin/time -v "$@" > "$work/$name.log" 2> "$work/$name.time"
  awk -v n="$name" '/Maximum resident/ {rss=$6} /Elapsed/ {t=$8} END {printf "%-14s peak RSS %6.2f GB  wall %s\n", n, rss/1e6, t}' "$work/$name.time"
}
python3 - "$examples" "$work/triples.jsonl" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1]).resolve()
with open(sys.argv[2], "w") as out:
    for row in json.loads((folder / "triples.json").read_text()):
        out.write(json.dumps({k: v if k == "instruction" else str(folder / v) for k, v in row.items()}) + "\n")
PY
[ -d "$work/ckpt" ] || step make-fixture .venv/bin/editreward make-fixture --size full --out "$work/ckpt"
step export "$py" export/build_onnx.py --ckpt "$work/ckpt/checkpoint" --prompts-from "$work/ckpt/prompts" --out "$work/fp32"
step ort-int4 "$py" quantize/quantize.py --model-dir "$work/fp32" --scheme ort-int4 --out "$work/int4"
step ort-int8 "$py" quantize/quantize.py --model-dir "$work/fp32" --scheme ort-int8 --out "$work/int8"
step ort-int4-vision "$py" quantize/quantize.py --model-dir "$work/fp32" --scheme ort-int4 --include-vision --out "$work/int4v"
rm -rf "$work/fp32"
for q in int4 int4v int8; do
  step "score-$q" .venv/bin/editreward score --model "$work/$q" --input "$work/triples.jsonl" --output "$work/scores-$q.jsonl"
  "$py" benchmarks/full_cpu.py --model "$work/$q" --examples "$examples" --out "$work/bench-$q.json" > /dev/null
done
step trt-onnx-only "$py" export/build_trt.py --ckpt "$work/ckpt/checkpoint" --prompts-from "$work/ckpt/prompts" \
  --precision bf16 --onnx-only --out "$work/bf16"
