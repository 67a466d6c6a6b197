"""`python -m uniopd` (and `torchrun ... -m uniopd`) runs the command line."""

import sys

from uniopd.cli import main

sys.exit(main())
