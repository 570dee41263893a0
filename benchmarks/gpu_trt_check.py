"""TensorRT GPU check, one command on a machine with an NVIDIA GPU and TensorRT installed:

    pip install -e '.[dev,trt]'         # tensorrt comes from NVIDIA's index (https://pypi.nvidia.com)
    python benchmarks/gpu_trt_check.py [--sizes tiny,full] [--precisions bf16,fp16,fp32] [--max-batch 8]
                                       [--reps 10] [--budget-s 480] [--cap-s [KEY=]SECONDS] [--workdir DIR] [--keep]
                                       [--out results/gpu-trt-check.json]
    python benchmarks/gpu_trt_check.py --dry-run     # tiny fixture, CPU: what CI runs

Offline (the lent GPU machines: no network, torch and transformers installed, no TensorRT): in the
repository, ``pip install --no-build-isolation --no-deps -e .``, or
``export PYTHONPATH=runtime:export:quantize:benchmarks``. There every engine is reported as
``skipped: tensorrt not installed`` up front and only the references run.

For each model size - ``tiny`` (the test fixture) and ``full`` (the real Qwen2.5-VL-7B
architecture: text hidden 3584, 28 layers, 28 heads, 4 key/value heads, intermediate 18944;
vision hidden 1280, depth 32, 16 heads, intermediate 3420, full attention in blocks 7/15/23/31,
output 3584; random weights drawn on the GPU, embedding rows = the fixture tokenizer's), on 8
triples (2 sources x 4 edits) of 448 x 448 images (256 tokens each) with rubric prompts of the real
length (~400 tokens per pass), each step in a process of its own:

1. first, every step's prerequisites: the libraries it imports (tensorrt, cuda-python, ModelOpt for
   fp8/int8/int4), the GPU, and the GPU memory, host memory and disk it needs; what cannot run is
   reported as skipped, with the reason, before anything is built;
2. the PyTorch reference (two full transformers passes per triple, as upstream) in bf16 and in
   float32, timed on the same workload; a reference that fails aborts the run (exit code 2);
3. per precision (tiny: fp32, fp16, bf16; full: bf16, fp16): export ONNX - at full size bf16 or
   fp16 graphs (~14 GB), never float32 ones (~29 GB) and never with the exporter's CPU
   self-validation, which for a 7B outlasts any session (fp32 and quantized precisions are tiny
   only); the static op-support check (expects no violation); the three engines with
   ``--max-batch`` and the default profiles (timing cache shared across builds);
4. parity of the per-head (mu, log_sigma) against the reference in the engine's dtype (bf16
   engines against the bf16 reference, the others against float32), within
   ``editreward_rt.tolerances`` tolerance ("tensorrt", precision) widened by the reference's own
   rounding when it is bf16, and every output finite; the drift from the float32 reference too;
5. times ``head_outputs`` after a warm-up at every batch size: batch-1 p50/p90 over ``--reps``
   calls and triples/s at batch 2, 4, 8; and reports the GPU memory the backend holds
   (device-wide free-memory drop while loaded and warm) beside the process's peak as the driver
   counts it (NVML or nvidia-smi: the engine build included).

The JSON results are rewritten after every step (atomically), so a time cap, an out-of-memory
kill or a session's end keeps what finished. Expected output (stderr carries the plan, export
steps, TensorRT warnings and build phases). The table on stdout has this shape - the numbers here
are illustrative placeholders, not measurements:

    size  variant                   status         build_s  max|dmu|     tol   p50_ms   p90_ms triples/s@max peak GiB
    tiny  torch-reference-bfloat16  ok                 nan       nan     nan      9.0     10.0          120.0     0.90
    tiny  torch-reference-float32   ok                 nan       nan     nan      8.5      9.1          130.0     0.95
    tiny  tensorrt-bf16             ok                19.8  1.10e-02   1e-01      2.8      3.1          640.0     1.30
    tiny  tensorrt-fp32             ok                21.4  3.10e-06   1e-03      2.9      3.2          612.0     1.31
    full  torch-reference-bfloat16  ok                 nan       nan     nan     95.0    101.0           11.0    35.20
    full  tensorrt-bf16             ok               612.3  2.30e-02   1e-01     45.0     49.0           21.0    19.80
    wrote results/gpu-trt-check.json

``status`` is ``ok``, ``failed-parity`` (not timed; the exit code is then 1), ``failed`` (with the
error: a build that raised, a crash, a time cap; exit code 1), ``no-tolerance`` (a quantized
precision without a stated bound: numbers reported, not judged), ``skipped`` (a prerequisite is
missing, with the reason) or ``not-run`` (the budget was spent). The JSON file (editreward_bench's
results schema, kind "latency") holds everything: the plan and the machine's facts, export/build/
load seconds, op-check violations, engine sizes, the manifest's memory estimate next to the
measured memory, parity, latency and throughput, and the environment. A full-size precision takes
~15 minutes (the ONNX export runs on the CPU, then TensorRT builds for ~10 min): give it
``--budget-s 3600`` and ~30 GB of disk (graphs and engines, deleted after each precision unless ``--keep``).
"""

import sys

from editreward_bench.gpu_trt import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
