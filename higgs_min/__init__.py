"""higgs_min: a minimal, exact reference for LoRA fine-tuning of Higgs Audio v2 style models."""
