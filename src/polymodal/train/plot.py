"""loss.png of a training run, from its metrics.jsonl records: train loss per step and eval loss as points
(log scale), the learning rate on a second axis, and beside them the per-task eval accuracy at the steps
where evaluation ran. Drawn with matplotlib, an optional dependency (`pip install polymodal[plot]`): without
it no plot is drawn and the run goes on."""

from __future__ import annotations

import io
from pathlib import Path

from polymodal.serialization import atomic_write_bytes


def plot_metrics(records: list[dict], png: Path) -> bool:
    """Writes png (atomically); False when matplotlib is not installed or there is nothing to draw."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return False
    train = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    accuracy = [r for r in evals if any(k.startswith("accuracy/") for k in r)]  # train/hooks.py's WorldAccuracy
    fig = Figure(figsize=(11 if accuracy else 7, 4.2), dpi=110, layout="constrained")
    loss_ax, *acc_ax = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    if train:
        steps, losses, lrs = zip(*train)
        loss_ax.plot(steps, losses, color="tab:blue", lw=1, label="train loss")
        lr_ax = loss_ax.twinx()
        lr_ax.plot(steps, lrs, color="tab:gray", lw=1, ls="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color="tab:orange",
                     label="eval loss (held-out)")
    loss_ax.set_yscale("log")
    for axis in (loss_ax.yaxis.set_major_formatter, loss_ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.3g"))
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (log scale)")
    loss_ax.grid(alpha=0.3)
    handles = [h for ax in fig.axes for h in ax.get_legend_handles_labels()[0]]
    loss_ax.legend(handles=handles, loc="lower left", fontsize=9)
    if accuracy:
        ax = acc_ax[0]
        steps = [r["step"] for r in accuracy]
        for key in [k for k in accuracy[-1] if k.startswith("accuracy/")]:
            ax.plot(steps, [100 * r.get(key, float("nan")) for r in accuracy], "o-",
                    label=key.removeprefix("accuracy/"))
        ax.set_ylim(0, 102)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title("greedy answers on held-out examples", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png, buf.getvalue())
    return True
