"""loss.png: drawn from metrics records with matplotlib (both panels when eval accuracy was recorded), written
atomically; without matplotlib, or with nothing to draw, no file and the run goes on."""

import sys

import numpy as np
from PIL import Image

from polymodal.train.plot import plot_metrics


def records(with_accuracy: bool) -> list[dict]:
    out = [{"step": s, "loss": 5.0 * 0.99 ** s, "lr": 1e-3 * min(1, s / 10), "grad_norm": 1.0} for s in range(1, 201)]
    for s in (50, 100, 150, 200):
        r = {"step": s, "eval_loss": 6.0 * 0.99 ** s}
        if with_accuracy:
            r.update({"accuracy/colour": s / 200, "accuracy/shape": s / 400})
        out.append(r)
    return out


def ink(image: Image.Image) -> np.ndarray:
    """Per column: is anything but white drawn there."""
    return (np.asarray(image.convert("L")) < 250).any(axis=0)


def test_loss_and_accuracy_panels(tmp_path):
    assert plot_metrics(records(with_accuracy=True), tmp_path / "loss.png")
    both = Image.open(tmp_path / "loss.png")
    assert plot_metrics(records(with_accuracy=False), tmp_path / "loss_only.png")
    alone = Image.open(tmp_path / "loss_only.png")
    assert both.width > 1.4 * alone.width and both.height == alone.height  # the accuracy panel beside the loss
    drawn = ink(both)
    assert drawn[: both.width // 2].mean() > 0.5 and drawn[both.width // 2:].mean() > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "loss_only.png"]  # no temp files left


def test_nothing_to_draw_or_no_matplotlib_writes_nothing(tmp_path, monkeypatch):
    assert not plot_metrics([], tmp_path / "empty.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert not plot_metrics(records(with_accuracy=True), tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []
