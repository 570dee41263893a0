#!/usr/bin/env bash
# The CPU numbers in docs/performance.md, in one command: small random-weight fixture, its fp32 ONNX
# export, CPU-runnable quantized variants, then latency (reference always included), parity, the
# report (docs/performance.md's generated tables, plots in docs/img/), sizes and per-scheme fidelity.
# Usage: bash benchmarks/cpu_suite.sh [WORKDIR] (default results/); run from the repository root.
set -euo pipefail
out=${1:-results}
work=$out/work
fixture=$work/fixture-small
python benchmarks/parity.py --fixture small --workdir "$work" --variant torch-fast --groups 1 --edits 2 --out "$out/warmup-parity.json"
quant() {  # scheme, source flag(s), name; always redone (seconds), so a scheme change is never stale
    python quantize/quantize.py --scheme "$1" $2 --out "$work/$3"
}
quant ort-int8 "--model-dir $fixture/onnx-fp32" small-ort-int8
quant ort-int8 "--model-dir $fixture/onnx-fp32 --option weight_type=uint8" small-ort-int8-u8u8
quant ort-int4 "--model-dir $fixture/onnx-fp32" small-ort-int4
quant ort-int4 "--model-dir $fixture/onnx-fp32 --option block_size=32" small-ort-int4-b32
quant ort-int4 "--model-dir $fixture/onnx-fp32 --option block_size=128" small-ort-int4-b128
quant ov-int8 "--model-dir $fixture/onnx-fp32" small-ov-int8
quant ov-int4 "--model-dir $fixture/onnx-fp32" small-ov-int4
quant bnb-int8 "--ckpt $fixture/checkpoint --prompts-from $fixture/bench-prompts" small-bnb-int8
quant bnb-nf4 "--ckpt $fixture/checkpoint --prompts-from $fixture/bench-prompts" small-bnb-nf4
variants=(--variant torch-fast --variant "model:$fixture/onnx-fp32" --variant "model:$work/small-ort-int8"
          --variant "model:$work/small-ort-int4" --variant "model:$work/small-ort-int4-b32" --variant "model:$work/small-ort-int4-b128"
          --variant "model:$work/small-bnb-int8" --variant "model:$work/small-bnb-nf4")
python benchmarks/parity.py --fixture small --workdir "$work" "${variants[@]}" --groups 6 --edits 6 --out "$out/parity-small.json" || true
python benchmarks/latency.py --fixture small --workdir "$work" "${variants[@]}" --reps 6 --out "$out/latency-small.json"
# Throughput against the reference at 1 and 2 threads, GEMM peak and % of it, batching, agreement.
python benchmarks/cpu_speed.py --fixture small --workdir "$work" --variant "model:$fixture/onnx-fp32" \
    --variant "model:$work/small-ort-int8" --variant "model:$work/small-ort-int4" --variant "model:$work/small-ort-int4-b32" \
    --variant "model:$work/small-ort-int4-b128" --variant "model:$work/small-ort-int8-u8u8" \
    --variant torch-fast@bf16 --variant "openvino:$fixture/onnx-fp32@fp32" --variant "openvino:$fixture/onnx-fp32@bf16" \
    --variant "model:$work/small-ov-int8" --variant "model:$work/small-ov-int4" \
    --variant "cli:$fixture/onnx-fp32" --variant "cli:$fixture/onnx-fp32@fp32" \
    --profile --out "$out/cpu-speed-small.json" | tee "$out/cpu-speed-small.md"
python benchmarks/report.py "$out/latency-small.json" "$out/parity-small.json" "$out/cpu-speed-small.json" --page docs/performance.md
python -m editreward_quant.sizes "$fixture/onnx-fp32" "$work/small-ort-int8" "$work/small-ort-int4" \
    "$work/small-ort-int4-b32" "$work/small-ort-int4-b128" "$work/small-bnb-int8" "$work/small-bnb-nf4" --json "$out/sizes-small.json"
python benchmarks/quant_report.py --fixture small --workdir "$work" --out "$out/quant-small.json"
