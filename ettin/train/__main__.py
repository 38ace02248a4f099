"""python -m ettin.train recipe=NAME [overrides]"""

import sys

from ettin.train.cli import main

sys.exit(main())
