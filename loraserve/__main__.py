"""`python -m loraserve`: the `loraserve` command-line client (see loraserve.cli)."""

import sys

from loraserve.cli import main

sys.exit(main())
