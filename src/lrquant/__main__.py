"""``python -m lrquant ...``: the ``lrquant`` console script's twin (torchrun launches modules)."""

import sys

from .cli import main

sys.exit(main())
