"""Bilinear (differentiable) against bicubic (reference) resize, on real photographs (``python benchmarks/resize_gap.py --help``; the code is ``editreward_bench.resize_gap``)."""

import sys

from editreward_bench.resize_gap import main

if __name__ == "__main__":
    sys.exit(main())
