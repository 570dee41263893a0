"""Serving benchmark: Ray Serve over loopback HTTP against in-process scoring of the same model (``python benchmarks/serve_bench.py --help``; the code is ``editreward_bench.serve_bench``)."""

import sys

from editreward_bench.serve_bench import main

if __name__ == "__main__":
    sys.exit(main())
