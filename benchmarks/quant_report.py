"""Quantization fidelity and size per scheme (``python benchmarks/quant_report.py --help``; the code is ``editreward_bench.quant_report``)."""

import sys

from editreward_bench.quant_report import main

if __name__ == "__main__":
    sys.exit(main())
