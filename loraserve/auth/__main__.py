"""`python -m loraserve.auth ...` (see `cli.py`)."""

import sys

from loraserve.auth.cli import main

sys.exit(main())
