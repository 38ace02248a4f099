"""python -m ettin.compare: The pair report of two runs (the code: ettin/report/)."""

import sys

from ettin.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
