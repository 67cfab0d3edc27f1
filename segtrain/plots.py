"""Pictures of results: the confusion matrix with class names on both axes.

Drawn with matplotlib (the optional extra ``segtrain[plots]``); without it the picture is left
out with one warning, and everything else still works.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from segtrain.errors import warn
from segtrain.io import atomic_write_bytes

INSTALL_HINT = "pip install 'segtrain[plots]'"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def as_table(cm: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """(2-D counts, row names, column names) of a confusion matrix [C, C], or of per-label
    matrices [L, 2, 2] stacked: rows '<label>: absent' / '<label>: present', columns predicted
    absent / present."""
    cm = np.asarray(cm)
    if cm.ndim == 3:
        rows = [f"{name}: {state}" for name in class_names for state in ("absent", "present")]
        return cm.reshape(-1, 2), rows, ["absent", "present"]
    return cm, list(class_names), list(class_names)


def confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str], title: str = "",
                         normalize: bool = True) -> bytes:
    """PNG bytes of the confusion matrix: rows ground truth, columns prediction, class names on
    both axes (per-label matrices [L, 2, 2]: two rows per label, see ``as_table``). ``normalize``:
    cells show each row's fractions (recall on the diagonal) and the row totals are printed with
    the names; else the cells show pixel counts.
    """
    from matplotlib.figure import Figure

    cm, row_names, column_names = as_table(cm, class_names)
    cm = np.asarray(cm, np.float64)
    n, m = len(row_names), len(column_names)
    totals = cm.sum(axis=1)
    values = np.divide(cm, totals[:, None], out=np.zeros_like(cm), where=totals[:, None] > 0) if normalize else cm
    side = min(max(4.0, 0.55 * n + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of the row's pixels" if normalize else "pixels")
    ax.set_xticks(range(m), labels=column_names, rotation=90 if m > 6 else 45, ha="right" if m <= 6 else "center")
    ylabels = [f"{name} ({int(t):,})" for name, t in zip(row_names, totals)] if normalize else row_names
    ax.set_yticks(range(n), labels=ylabels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground truth" + (" (pixels)" if normalize else ""))
    if title:
        ax.set_title(title, fontsize=10, wrap=True)
    if n <= 30:  # numbers in the cells while they fit
        limit = values.max() if values.size else 0.0
        for i in range(n):
            for j in range(m):
                v = values[i, j]
                text = f"{v:.2f}" if normalize else f"{int(v):,}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if n > 12 else 9,
                        color="white" if limit and v > 0.6 * limit else "black")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    return out.getvalue()


def write_confusion_matrix(path: str, cm: np.ndarray, class_names: Sequence[str], title: str = "",
                           normalize: bool = True) -> bool:
    """Writes the picture to ``path`` (atomically); False, with a warning, without matplotlib."""
    if not have_matplotlib():
        warn(f"The confusion-matrix picture needs matplotlib: {INSTALL_HINT}. The matrix is in the JSON results.")
        return False
    atomic_write_bytes(path, confusion_matrix_png(cm, class_names, title, normalize))
    return True


def reliability_png(reliability: dict, ece: float, title: str = "", calibrated: dict | None = None) -> bytes:
    """PNG bytes of a reliability diagram: each confidence bin's accuracy as a bar against the
    diagonal of perfect calibration, the share of pixels per bin below (segtrain.failures
    makes the bins). ``calibrated``: the bins after temperature scaling, drawn as a line."""
    from matplotlib.figure import Figure

    count = np.asarray(reliability["count"], np.float64)
    accuracy = np.asarray([np.nan if v is None else v for v in reliability["accuracy"]], np.float64)
    bins = count.size
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(5.0, 6.0))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.bar(centres, np.nan_to_num(accuracy), width=1.0 / bins, edgecolor="black", color="#4c72b0",
            label=f"accuracy (ECE {ece:.4f})")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if calibrated is not None:
        after = np.asarray([np.nan if v is None else v for v in calibrated["accuracy"]], np.float64)
        conf = np.asarray([np.nan if v is None else v for v in calibrated["confidence"]], np.float64)
        top.plot(conf, after, "o-", color="#dd8452", label=f"after temperature scaling (ECE {calibrated['ece']:.4f})")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    if title:
        top.set_title(title, fontsize=10, wrap=True)
    share = count / max(count.sum(), 1.0)
    bottom.bar(centres, share, width=1.0 / bins, edgecolor="black", color="#999999")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share of pixels")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
