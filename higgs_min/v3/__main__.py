"""`python -m higgs_min.v3 [PRESET]`: a v3 preset's parameter names, shapes and count (meta device)."""

import sys

from higgs_min.v3.model import describe

print(describe(sys.argv[1] if len(sys.argv) > 1 else "v3-4b"))
