"""``python -m ettin.eval``: the command line lives in ettin.evaluation.cli."""

import sys

from ettin.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
