"""Evaluation: the built-in world's held-out accuracy (`world.py`), the user's own documents scored with the
field's metrics (`documents.py`, `metrics.py`, `ngrams.py`), and a progress display (`progress.py`)."""

from polymodal.evaluate.world import TaskScore, answer, blank, drawn, evaluate, majority, table, written

__all__ = ["TaskScore", "answer", "blank", "drawn", "evaluate", "majority", "table", "written"]
