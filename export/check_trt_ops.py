"""python export/check_trt_ops.py DIR_OR_ONNX [--trt-version 10.15|10.0|all] [--notes]

Lists every node of the TensorRT-bound graphs that TensorRT's ONNX parser does not support
(operator, attribute or data type); exits 1 when there is any.
"""

import sys

from editreward_trt.ops import main

if __name__ == "__main__":
    sys.exit(main())
