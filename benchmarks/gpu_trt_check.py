"""TensorRT GPU check, one command on a machine with an NVIDIA GPU and TensorRT installed:

    pip install -e '.[dev,trt]'         # tensorrt comes from NVIDIA's index (https://pypi.nvidia.com)
    python benchmarks/gpu_trt_check.py [--sizes tiny,full] [--precisions bf16,fp16,fp32] [--max-batch 8]
                                       [--reps 10] [--workdir DIR] [--keep] [--out results/gpu-trt-check.json]

For each model size - ``tiny`` (the test fixture) and ``full`` (the real Qwen2.5-VL-7B
architecture: text hidden 3584, 28 layers, 28 heads, 4 key/value heads, intermediate 18944;
vision hidden 1280, depth 32, 16 heads, intermediate 3420, full attention in blocks 7/15/23/31,
output 3584; random weights drawn on the GPU, embedding rows = the fixture tokenizer's) - it:

1. computes the PyTorch reference (two full transformers passes per triple, as upstream) on 8
   synthetic triples (2 sources x 4 edits), in float32 (bfloat16 for the full model when the GPU
   has under 60 GiB), before any engine takes memory;
2. per precision (tiny: fp32, fp16, bf16; full: bf16, fp16 - fp32 needs ~62 GB of disk and a
   40+ GB GPU; fp8/int8/int4 when ModelOpt is installed): exports ONNX,
   runs the static op-support check (expects no violation), builds the three engines with
   ``--max-batch`` and the default profiles (timing cache shared across builds), loads them;
3. checks parity of the per-head (mu, log_sigma) against the reference, within
   ``editreward_rt.tolerances`` tolerance ("tensorrt", precision) (widened to the bf16 torch tolerance
   when the reference itself is bf16), and that every output is finite;
4. times ``head_outputs``: batch-1 p50/p90 over ``--reps`` calls after a warm-up, and triples/s
   at batch 2, 4, 8; and reports the GPU memory the backend holds (device-wide free-memory drop
   while loaded and warm: engines' weights, activation memory, cache and I/O buffers).

Expected output (stderr carries progress: export steps, TensorRT warnings and build phases, then one
JSON line per precision). The table on stdout has this shape - the numbers here are illustrative
placeholders, not measurements:

    size  precision status         build_s  max|dmu|     tol   p50_ms   p90_ms triples/s@max    GiB
    tiny  fp32      ok                21.4  3.10e-06   1e-03      2.9      3.2        612.0   0.31
    tiny  fp16      ok                25.0  4.20e-03   5e-02      2.7      3.0        655.0   0.30
    tiny  bf16      ok                19.8  1.10e-02   1e-01      2.8      3.1        640.0   0.30
    full  bf16      ok               612.3  2.30e-02   1e-01     95.0    101.0         21.0  19.80
    full  fp16      ok               701.9  1.80e-02   5e-02     90.0     97.0         22.0  23.10
    wrote results/gpu-trt-check.json

``status`` is ``ok``, ``failed-parity`` (the exit code is then 1), ``no-tolerance`` (a quantized
precision without a stated bound: numbers reported, not judged) or ``skipped`` with the reason
(e.g. TensorRT missing, a quantized precision without its module, an out-of-memory build).
The JSON file (editreward_bench's results schema, kind "latency") holds everything: export/build/
load seconds, op-check violations, engine sizes, the manifest's memory estimate next to the
measured memory, parity, latency and throughput, and the environment. Expect minutes per full-size
precision (the ONNX export of the 7B model runs on the CPU, then TensorRT builds for ~10 min) and
~16 GB of disk per bf16 folder (deleted after each precision unless ``--keep``).
"""

import sys

from editreward_bench.gpu_trt import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
