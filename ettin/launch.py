"""python -m ettin.launch: Render and submit the Slurm job of a training run (the code: ettin/cluster/launch.py)."""

import sys

from ettin.cluster.launch import main

if __name__ == "__main__":
    sys.exit(main())
