"""KOSMOS-1 (Huang et al. 2023): config, model (a declaration on `fusion/early.py`), document format and
presets (its torchscale conversion is `convert/torchscale.py`)."""
