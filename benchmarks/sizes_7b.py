"""Decoder weight bytes of the ONNX Runtime schemes at the 7B's real shapes, measured, on a CPU (``python benchmarks/sizes_7b.py --help``; the code is ``editreward_bench.sizes_7b``)."""

import sys

from editreward_bench.sizes_7b import main

if __name__ == "__main__":
    sys.exit(main())
