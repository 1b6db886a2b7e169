"""Gemini-style early fusion (Gemini Team 2023; Fuyu): config, model (a declaration on `fusion/early.py`),
document format, HF (Fuyu) conversion and presets."""
