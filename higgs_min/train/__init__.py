"""The run around the core loop: options, the resume guard, opening data, building the model, plots.

    python -m higgs_min.train      (= higgs-min train; __main__.py -> run.main)
"""
