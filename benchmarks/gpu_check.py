"""GPU matrix check, one call (< 8 minutes) on a GPU machine: see editreward_bench.gpu_matrix (``--help``).

Offline (the lent GPU machines: no network, torch and transformers installed), in the repository:

    pip install --no-build-isolation --no-deps -e .      # or: export PYTHONPATH=runtime:export:quantize:benchmarks
    python benchmarks/gpu_check.py                       # results/gpu-check.json, rewritten after every variant
    python benchmarks/gpu_check.py --dry-run             # the same run on the tiny fixture and the CPU (what CI runs)
"""

import sys

from editreward_bench.gpu_matrix import main

if __name__ == "__main__":
    sys.exit(main())
