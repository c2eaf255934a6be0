"""`python -m higgs_min.export`: the entry point (the code is in merge.py)."""

import sys

from higgs_min.export.merge import main

sys.exit(main())
