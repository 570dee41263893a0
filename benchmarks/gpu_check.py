"""GPU matrix check (one call on a GPU machine): see editreward_bench.gpu_matrix (``--help``)."""

import sys

from editreward_bench.gpu_matrix import main

if __name__ == "__main__":
    sys.exit(main())
