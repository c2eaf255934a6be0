"""`python -m higgs_min.train`: the entry point (the code is in run.py)."""

import sys

from higgs_min.train.run import main

sys.exit(main())
