import sys

from inference_svc.cli import main

sys.exit(main())
