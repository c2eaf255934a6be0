"""Using a trained model elsewhere: merged base folders, transformers' HiggsAudioV2 and PEFT formats.

    python -m higgs_min.export ...    (= higgs-min export; __main__.py -> merge.main)
"""
