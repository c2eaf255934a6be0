"""The data pipeline: other layouts -> the project's JSONL (convert), wav -> codes (encode),
each line checked (sanitize, codes_file), JSONL -> packed corpus (pack, corpus).

    python -m higgs_min.prepare ...   (= higgs-min prepare; __main__.py -> encode.main)
"""
