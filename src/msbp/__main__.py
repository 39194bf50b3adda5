"""``python -m msbp``: the same as the ``msbp`` console script."""

import sys

from msbp.cli import main

sys.exit(main())
