"""loss.png: drawn from metrics records (both panels when eval accuracy was recorded), written atomically;
tick labels that never overlap on any loss range; the smoothed train loss over the raw one; each task's
chance and majority lines; `polymodal plot RUN` redraws it; with nothing to draw, or no matplotlib, no file."""

import math
import random
import sys

import numpy as np
import pytest
from PIL import Image

from polymodal.cli import main
from polymodal.data.synthetic import World
from polymodal.train.plot import loss_figure, plot_metrics, world_baselines


def records(with_accuracy: bool, top: float = 5.0, bottom: float = 0.5, steps: int = 200) -> list[dict]:
    rng = random.Random(0)
    rate = math.log(top / bottom) / steps
    out = [{"step": s, "loss": top * math.exp(-rate * s + rng.gauss(0, 0.3)), "lr": 1e-3 * min(1, s / 10),
            "grad_norm": 1.0} for s in range(1, steps + 1)]
    for s in range(steps // 4, steps + 1, steps // 4):
        r = {"step": s, "eval_loss": 1.2 * top * math.exp(-rate * s)}
        if with_accuracy:
            r.update({"accuracy/colour": s / steps, "accuracy/shape": s / (2 * steps)})
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


@pytest.mark.parametrize("top, bottom", [(6.7, 2e-4), (6.7, 0.2), (0.36, 0.28), (1e3, 1e-6)])
def test_loss_axis_labels_are_readable_on_any_range(top, bottom):
    fig = loss_figure(records(False, top, bottom))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    labels = [t for t in ax.get_yticklabels(which="both") if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(labels) >= 2, [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]  # none overlap
    assert all("10^" not in t.get_text() and "$" not in t.get_text() for t in labels)  # plain decimals


def test_train_loss_is_smoothed_over_the_faint_raw_curve():
    fig = loss_figure(records(False, steps=1000))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    raw, smooth = lines["train loss (raw)"], lines["train loss (EMA, ~20 steps)"]
    assert raw.get_alpha() < 0.5 and (smooth.get_alpha() or 1.0) == 1.0
    roughness = lambda y: np.abs(np.diff(np.log(y))).mean()  # noqa: E731
    assert roughness(smooth.get_ydata()) < roughness(raw.get_ydata()) / 5
    assert abs(math.log(smooth.get_ydata()[-1] / np.median(raw.get_ydata()[-50:]))) < 0.3  # follows it


def test_accuracy_panel_draws_each_tasks_chance_and_majority():
    baselines = world_baselines(["colour", "shape"])
    world = World(seed=0)
    assert baselines["colour"]["chance"] == world.chance("colour") and 0 <= baselines["shape"]["majority"] <= 1
    fig = loss_figure(records(True), baselines)
    acc = fig.axes[1]
    flat = {round(line.get_ydata()[0], 6) for line in acc.get_lines()
            if len(line.get_ydata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]}
    for task in ("colour", "shape"):
        assert round(100 * baselines[task]["chance"], 6) in flat and round(100 * baselines[task]["majority"], 6) in flat
    assert {"chance", "majority answer"} <= {t.get_text() for t in acc.get_legend().get_texts()}


def test_polymodal_plot_redraws_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in records(True)))
    assert main(["plot", str(run)]) == 0 and Image.open(run / "loss.png").format == "PNG"
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 0 and (tmp_path / "x.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_nothing_to_draw_or_no_matplotlib_writes_nothing(tmp_path, monkeypatch, capsys):
    assert not plot_metrics([], tmp_path / "empty.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert not plot_metrics(records(with_accuracy=True), tmp_path / "loss.png")
    assert "not drawn: matplotlib is not installed" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
