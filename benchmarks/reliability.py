"""Issue 25's reliability cases replayed (in-process and against a live ``editreward serve``), written to ``docs/reliability.md`` (``python benchmarks/reliability.py --help``; the code is ``editreward_bench.reliability``)."""

import sys

from editreward_bench.reliability import main

if __name__ == "__main__":
    sys.exit(main())
