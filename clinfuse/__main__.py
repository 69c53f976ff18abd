"""`python -m clinfuse` runs the command line."""

import sys

from clinfuse.cli import main

sys.exit(main())
