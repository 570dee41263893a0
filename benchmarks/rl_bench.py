"""RL reward benchmark: see editreward_bench.rl_bench (``python benchmarks/rl_bench.py --help``)."""

import sys

from editreward_bench.rl_bench import main

if __name__ == "__main__":
    sys.exit(main())
