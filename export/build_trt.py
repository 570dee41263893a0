"""python export/build_trt.py --ckpt CKPT [--precision bf16|fp16|fp32|fp8|int8|int4] [--max-batch N]
    [--max-image-tokens N] [--max-seq N] [--out DIR] [--workspace GB] [--timing-cache FILE]
    [--base BASE] [--prompts-from PATH] [--onnx-only]

Exports the checkpoint to ONNX, writes the TensorRT profiles into the manifest, checks the ops
against TensorRT's parser, then builds one engine per graph (needs TensorRT and an NVIDIA GPU;
--onnx-only stops before the build and runs anywhere). See editreward_trt.build.
"""

import sys

from editreward_trt.build import main

if __name__ == "__main__":
    sys.exit(main())
