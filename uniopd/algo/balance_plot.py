"""PNG of the pass-rate histogram before and after offline difficulty balancing.

matplotlib is imported inside the function and drives the Agg canvas directly (no
pyplot), so importing uniopd stays cheap and no global backend is switched for the
caller. The file is written to a temporary name in the target folder and moved into
place with os.replace, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["save_figure_png", "save_histogram_png"]


def save_histogram_png(
    before_counts: Sequence[int],
    after_counts: Sequence[int],
    path: str | os.PathLike[str],
    *,
    num_bins: int,
) -> Path:
    """Draw side-by-side bars of the two histograms (num_bins each) and save a PNG.

    Bin i is labelled with its pass-rate range [i/k, (i+1)/k). Returns the path written.
    """
    before, after = list(before_counts), list(after_counts)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if len(before) != num_bins or len(after) != num_bins:
        raise ValueError(
            f"expected {num_bins} counts per histogram, got {len(before)} before "
            f"and {len(after)} after"
        )

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.6 * num_bins + 2.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.4
    centers = list(range(num_bins))
    ax.bar([c - width / 2 for c in centers], before, width, label=f"before (n={sum(before)})")
    ax.bar([c + width / 2 for c in centers], after, width, label=f"after (n={sum(after)})")
    ax.set_xticks(centers)
    ax.set_xticklabels(
        [f"{i / num_bins:.2g}–{(i + 1) / num_bins:.2g}" for i in centers],
        rotation=45 if num_bins > 6 else 0,
        ha="right" if num_bins > 6 else "center",
    )
    ax.set_xlabel("student pass rate")
    ax.set_ylabel("prompts")
    ax.set_title("Pass-rate histogram before and after difficulty balancing")
    ax.legend()
    return save_figure_png(fig, path)


def save_figure_png(fig, path: str | os.PathLike[str]) -> Path:
    """Write a matplotlib Figure (with an Agg canvas) as PNG, atomically."""
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
