"""``python -m epkit.cli …``: the ``epkit`` command (node supervisors and tests start it this way)."""

import sys

from epkit.cli import main

sys.exit(main())
