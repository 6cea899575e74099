"""``python -m presenced``: the same as the ``presenced`` console script."""

import sys

from presenced.cli import main

sys.exit(main())
