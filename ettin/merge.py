"""python -m ettin.merge: Average checkpoints into a new one (the code: ettin/train/merge.py)."""

import sys

from ettin.train.merge import main

if __name__ == "__main__":
    sys.exit(main())
