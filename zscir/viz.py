"""Pictures people would rather see than read: retrieval grids, training curves, log-log cost curves (PNG, matplotlib)."""
from __future__ import annotations

import io
import os
import textwrap
from typing import Dict, List, NamedTuple, Sequence, Union

from PIL import Image

from .checkpoint import atomic_write_bytes


class GridRow(NamedTuple):
    """One query: the reference image, its text, and ranked results (image, caption, is_target)."""

    reference: Image.Image
    text: str
    results: Sequence[tuple]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG figures need matplotlib: pip install zscir[plot]") from None
    return plt


def _save(fig, out: Union[str, os.PathLike], dpi: int = 90) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(out, buf.getvalue())


def save_retrieval_grid(out: Union[str, os.PathLike], rows: Sequence[GridRow]) -> None:
    """PNG grid: per row the reference (titled with the text) then the ranked results; targets framed in green."""
    plt = _pyplot()
    cols = 1 + max(len(r.results) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols, 2.5 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.reference)
        axes[r, 0].set_title("reference +\n" + textwrap.fill(row.text, 26, max_lines=3, placeholder=" ..."), fontsize=7)
        for c, (image, caption, is_target) in enumerate(row.results, start=1):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_title(f"#{c} {caption}{' TARGET' if is_target else ''}", fontsize=7,
                         color="green" if is_target else "black")
            if is_target:  # axis("off") hides spines, so frame with a rectangle
                ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=4, color="green"))
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def save_training_curves(out: Union[str, os.PathLike], curves: Dict[str, List[Dict[str, float]]]) -> None:
    """PNG of training loss against step, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in curves.items():
        if hist:
            ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def save_loglog(out: Union[str, os.PathLike], panels: Dict[str, Dict[str, Sequence[tuple]]], xlabel: str,
                title: str = "") -> None:
    """PNG of log-log panels side by side: panel title -> series name -> (x, y) points (non-positive y dropped)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    markers = "osD^v<>p*h"
    for ax, (name, series) in zip(axes[0], panels.items()):
        for i, (label, points) in enumerate(series.items()):
            pts = [(x, y) for x, y in points if x > 0 and y is not None and y > 0]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers[i % len(markers)], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
