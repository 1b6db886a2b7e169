"""`parts.py`: freezing as an explicit set of trainable parts, shared by the families. The registries of every
family (`MODEL_CLASSES`, `CONFIG_CLASSES`, `load_config`) are `polymodal.families`'."""
