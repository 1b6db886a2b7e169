"""PaliGemma (Beyer et al. 2024): config, model (a declaration on `fusion/early.py`), document format, HF
conversion and presets."""
