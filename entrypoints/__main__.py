"""`python -m entrypoints`: the `loraserve` command-line client (see entrypoints.cli)."""

import sys

from entrypoints.cli import main

sys.exit(main())
