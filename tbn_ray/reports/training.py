"""A training run's metrics: ``metrics.csv`` (one row per epoch) and ``metrics.png``, written
after every epoch by the in-process and the Ray Train paths alike."""

from __future__ import annotations

import csv
import io
from typing import Any

from tbn_ray.store.runs import Run


def write_metrics(run: Run, rows: list[dict[str, Any]]) -> None:
    """metrics.csv with one row per epoch (the union of keys, in first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    run.storage.write_text("metrics.csv", buf.getvalue())


#: Curves on the metrics plot: (column, label, colour); the loss on the left axis, accuracies on the right.
_LOSS_CURVES = (("train_loss", "train loss (adversarial)", "tab:red"),)
_ACC_CURVES = (
    ("train_acc", "train accuracy (adversarial)", "tab:orange"),
    ("heldout_clean_acc", "held-out clean accuracy", "tab:blue"),
    ("heldout_pgd_acc", "held-out PGD accuracy", "tab:green"),
)


def write_metrics_plot(run: Run, rows: list[dict[str, Any]]) -> str:
    """metrics.png: loss and accuracies per epoch, so a run's progress is visible without a notebook."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax_loss = fig.add_subplot()
    ax_acc = ax_loss.twinx()
    for ax, curves, style in ((ax_loss, _LOSS_CURVES, "--"), (ax_acc, _ACC_CURVES, "-")):
        for key, label, colour in curves:
            points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, color=colour, marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(ylabel="accuracy", ylim=(0, 1))
    ax_loss.grid(alpha=0.3)
    handles = [h for ax in (ax_loss, ax_acc) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    ax_loss.set_title(
        run.uri.rstrip("/").rpartition("/")[2] or run.uri, fontsize=9
    )  # the run's name: a path is cut off
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the axes
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return run.storage.write_bytes("metrics.png", buf.getvalue())
