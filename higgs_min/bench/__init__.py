"""`make bench`: every figure measured beside its alternative, and `make gpu-check`. Not imported by training.

    python -m higgs_min.bench ...     (= higgs-min bench; __main__.py -> rows.main)
"""
