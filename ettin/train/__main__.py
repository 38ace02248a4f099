"""python -m ettin.train recipe=NAME [overrides]: the command lives in ettin/train_command.py, above the
packages it drives."""

import sys

from ettin.train_command import main

sys.exit(main())
