"""ettin: paired encoder/decoder pretraining (docs/design.md draws the packages and their import rule).

The recipes and the config groups ship inside the package, so an installed ettin (editable or not)
finds them; ``ETTIN_RECIPES_DIR`` / ``ETTIN_CONF_DIR`` point at other folders.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

CONF_DIR = Path(os.environ.get("ETTIN_CONF_DIR", Path(__file__).resolve().parent / "conf"))
RECIPES_DIR = Path(os.environ.get("ETTIN_RECIPES_DIR", Path(__file__).resolve().parent / "recipes"))
