"""Quantize an EditReward checkpoint or exported model: see editreward_quant.cli (``--help``)."""

import sys

from editreward_quant.cli import main

if __name__ == "__main__":
    sys.exit(main())
