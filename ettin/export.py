"""python -m ettin.export: Export a run or checkpoint as a Hugging Face folder (the code: ettin/model/export.py)."""

import sys

from ettin.model.export import main

if __name__ == "__main__":
    sys.exit(main())
