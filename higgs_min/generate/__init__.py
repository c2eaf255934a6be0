"""Using a trained model: generation with a KV cache and the official delay-pattern sampling.

    python -m higgs_min.generate ...  (= higgs-min generate; __main__.py -> cli.main)
"""
