"""One style and one way to save for every figure module (plotting, landscape_plot, report, study).

matplotlib is imported by pyplot() only, so a module that draws imports it when it draws.
"""

from __future__ import annotations

from pathlib import Path

from bnctl import rundir


def pyplot():
    """matplotlib.pyplot for files (the Agg backend, no display) with bnctl's figure style."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "legend.frameon": False, "font.size": 10,
    })
    return plt


def save_figure(fig, path: Path) -> Path:
    """Save a figure atomically and release it."""
    import matplotlib.pyplot as plt

    try:
        with rundir.atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
