"""`python -m higgs_min.generate`: the entry point (the code is in cli.py)."""

import sys

from higgs_min.generate.cli import main

sys.exit(main())
