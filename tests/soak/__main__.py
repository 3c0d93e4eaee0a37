"""``python -m soak`` (with ``tests/`` on ``sys.path``; ``nox -s soak`` does that)."""

import sys

from soak._run import main

sys.exit(main())
