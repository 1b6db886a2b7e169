"""loss.png of a training run, from its metrics.jsonl records (`polymodal plot RUN` redraws it).

Left: the train loss per step, smoothed by a debiased exponential moving average (as TensorBoard's
smoothing slider) over the raw curve drawn faint behind it, the eval loss as points, on a log scale whose
labels stay apart on any range (numbers on the decades; on 2 and 5 between them only when the axis spans
at most 2.5 decades, and on 3 too within one), and the learning rate on a second axis. Right, when evals
scored answers: each task's held-out accuracy at every eval beside its baselines in the task's colour: chance (dotted) and, on the
built-in world, the majority answer to the same questions (dashed), and the blank-media model where a run
recorded one (`eval_blanked`). Drawn with matplotlib (no pyplot: no GUI backend, no global state).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from polymodal.data.synthetic import LOCATION_TASKS, WORLD
from polymodal.evaluate import majority
from polymodal.serialization import atomic_write_bytes
from polymodal.train.hooks import WorldAccuracy
from polymodal.errors import MissingFileError


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a last line cut short by a kill is left out)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: {run} is not a training run directory")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def ema(values: list[float], steps: int) -> list[float]:
    """Debiased exponential moving average over about `steps` values (Adam's bias correction)."""
    beta, out, avg = 1 - 1 / max(steps, 1), [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** t))
    return out


def world_baselines(tasks: list[str]) -> dict[str, dict[str, float]]:
    """Chance and the majority answer's accuracy on the held-out questions of each world task that a training
    eval scores (`WorldAccuracy`'s); tasks the world does not know are left out."""
    out, hook = {}, WorldAccuracy(())
    for task in tasks:
        if task not in WORLD.tasks or task in LOCATION_TASKS:  # scored by IoU, beside their own baselines
            continue
        examples = [WORLD.sample(task, hook.start + i, "eval") for i in range(hook.n)]
        guesses = majority(WORLD, task, [e.document.texts[0] for e in examples])
        out[task] = {"chance": WORLD.chance(task),
                     "majority": sum(g == e.answer for g, e in zip(guesses, examples)) / hook.n}
    return out


def loss_figure(records: list[dict], baselines: dict[str, dict[str, float]] | None = None):
    """The matplotlib Figure of loss.png; None when there is nothing to draw."""
    from matplotlib.figure import Figure

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    accuracy = [r for r in evals if any(k.startswith("accuracy/") for k in r)]  # train/hooks.py's WorldAccuracy
    fig = Figure(figsize=(12 if accuracy else 7, 4.4), dpi=110, layout="constrained")
    loss_ax, *acc_ax = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    _loss_panel(loss_ax, train, evals)
    if accuracy:
        _accuracy_panel(acc_ax[0], accuracy, baselines or {})
    return fig


def _loss_panel(ax, train: list[dict], evals: list[dict]) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter

    lr_ax = None
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        span = max(1, len(train) // 50)
        ax.plot(steps, losses, color="tab:blue", lw=0.8, alpha=0.25, label="train loss (raw)")
        ax.plot(steps, ema(losses, span), color="tab:blue", lw=1.6,
                label=f"train loss (EMA, ~{span} steps)" if span > 1 else "train loss")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in train], color="tab:gray", lw=1, ls="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color="tab:orange",
                label="eval loss (held-out)")
    ax.set_yscale("log")
    values = [v for v in [r["loss"] for r in train] + [r["eval_loss"] for r in evals] if v > 0 and math.isfinite(v)]
    decades = math.log10(max(values) / min(values)) if values else 0.0
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_major_formatter(_decimal)
    between = (2, 3, 5) if decades <= 1 else (2, 5) if decades <= 2.5 else ()  # labels ~1 cm apart at most
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=between or (1.0,), numticks=12))
    ax.yaxis.set_minor_formatter(_decimal if between else NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.grid(alpha=0.3, which="both")
    handles = [h for a in (ax, lr_ax) if a is not None for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper right", fontsize=8)


def _decimal(value: float, _position=None) -> str:
    """A tick value as a short decimal (0.02, 0.5, 3), never 2x10^-2."""
    return f"{value:.3g}"


def _accuracy_panel(ax, accuracy: list[dict], baselines: dict[str, dict[str, float]]) -> None:
    steps = [r["step"] for r in accuracy]
    colours = iter(f"C{i}" for i in range(10 ** 3))
    blanked = [r for r in accuracy if r.get("eval_blanked")]
    for task in [k.removeprefix("accuracy/") for k in accuracy[-1] if k.startswith("accuracy/")]:
        colour = next(colours)
        ax.plot(steps, [100 * r.get(f"accuracy/{task}", float("nan")) for r in accuracy], "o-", color=colour,
                label=task)
        base = baselines.get(task, {})
        if "chance" in base:
            ax.axhline(100 * base["chance"], color=colour, ls=":", lw=1)
        if "majority" in base:
            ax.axhline(100 * base["majority"], color=colour, ls="--", lw=1, alpha=0.7)
        if blanked:
            ax.plot([r["step"] for r in blanked], [100 * r["eval_blanked"].get(task, float("nan")) for r in blanked],
                    "x", color=colour)
    ax.plot([], [], "k:", lw=1, label="chance")
    if any("majority" in b for b in baselines.values()):
        ax.plot([], [], "k--", lw=1, alpha=0.7, label="majority answer")
    if blanked:
        ax.plot([], [], "kx", label="blank media")
    ax.set_ylim(0, 102)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("greedy answers on held-out examples, beside each task's baselines", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_metrics(records: list[dict], png: Path, baselines: dict[str, dict[str, float]] | None = None) -> bool:
    """Writes png (atomically); False when there is nothing to draw or matplotlib is not installed (said)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        print(f"{png} not drawn: matplotlib is not installed (pip install matplotlib)", flush=True)
        return False
    if baselines is None:
        tasks = sorted({k.removeprefix("accuracy/") for r in records for k in r if k.startswith("accuracy/")})
        baselines = world_baselines(tasks)
    fig = loss_figure(records, baselines)
    if fig is None:
        return False
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png, buf.getvalue())
    return True
