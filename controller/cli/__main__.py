"""`python -m controller.cli` is `sledge`."""

import sys

from controller.cli import main

sys.exit(main())
