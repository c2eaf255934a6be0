"""`python -m higgs_min.prepare`: the entry point (the code is in encode.py)."""

import sys

from higgs_min.prepare.encode import main

sys.exit(main())
