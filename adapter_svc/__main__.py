import sys

from adapter_svc.cli import main

sys.exit(main())
