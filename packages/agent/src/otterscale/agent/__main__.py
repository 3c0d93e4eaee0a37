"""``python -m otterscale.agent``: the same as ``otterscale agent``."""

import sys

from ._cli import main

sys.exit(main())
