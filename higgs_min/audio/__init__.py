"""Audio <-> codes: the Higgs Audio v2 tokenizer (tokenizer, layers, hubert) and DAC (codec), with wav io.
"""
