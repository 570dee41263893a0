"""Report: see editreward_bench.report (``python benchmarks/report.py --help``)."""

import sys

from editreward_bench.report import main

if __name__ == "__main__":
    sys.exit(main())
