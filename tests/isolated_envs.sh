#!/usr/bin/env bash
# Quantizers whose libraries cannot share the main environment, each tested in its own venv:
# GPTQModel 7.6 pins numpy 2.2.6; NVIDIA ModelOpt swaps in onnxruntime-gpu and pins onnx ~=1.21.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gptq
.venv-gptq/bin/pip install -q -c constraints-cpu.txt -e '.[torch,gptq,quant,bench]' pytest ml_dtypes
.venv-gptq/bin/python -m pytest -q tests/quantize/test_gptq_scheme.py
python3 -m venv .venv-modelopt
.venv-modelopt/bin/pip install -q -c constraints-cpu.txt -e '.[torch]' pytest ml_dtypes
.venv-modelopt/bin/pip install -q -e '.[trt-quant]'
# Both wheels provide the onnxruntime module: keep only the GPU build ModelOpt was made for.
.venv-modelopt/bin/pip uninstall -q -y onnxruntime
.venv-modelopt/bin/pip install -q --force-reinstall --no-deps "onnxruntime-gpu==1.24.4"
.venv-modelopt/bin/python -m pytest -q tests/quantize/test_trt_schemes.py
