"""`python -m higgs_min.bench`: the entry point (the code is in rows.py)."""

import sys

from higgs_min.bench.rows import main

sys.exit(main())
