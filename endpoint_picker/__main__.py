import sys

from endpoint_picker.cli import main

sys.exit(main())
