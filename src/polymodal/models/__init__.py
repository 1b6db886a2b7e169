"""The early-fusion core (`fusion.py`, `drawing.py`, `constraints.py`), `parts.py` and the early-fusion families'
models. The registries of every family (`MODEL_CLASSES`, `CONFIG_CLASSES`, `load_config`) are `polymodal.families`'."""
