"""Chameleon (Chameleon Team 2024): config, model (a declaration on `fusion/early.py` and its own image
writer), document format, HF conversion and presets."""
