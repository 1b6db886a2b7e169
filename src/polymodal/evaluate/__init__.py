"""Evaluation: the built-in world's held-out accuracy (`world.py`; boxes and masks: `locations.py`), the user's own
documents scored with the field's metrics (`user_data.py`, `metrics.py`, `ngrams.py`; boxes and masks:
`user_locations.py`) and shown and kept (`report.py`)."""

from polymodal.evaluate.world import TaskScore, answer, blank, drawn, evaluate, majority, table, written

__all__ = ["TaskScore", "answer", "blank", "drawn", "evaluate", "majority", "table", "written"]
