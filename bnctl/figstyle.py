"""One style and one way to save for every figure module (plotting, landscape_plot, report, study).

Figures are matplotlib Figures built outside pyplot (no backend, no window), so they work in files
and notebooks alike; matplotlib is imported only when a figure is built.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bnctl import rundir

# The house style of every figure, applied to bnctl's figures only: a notebook's own plots keep theirs.
STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "legend.frameon": False, "font.size": 10}


def new_figure(**kwargs):
    """A matplotlib Figure outside pyplot: no backend, no window, nothing shown twice in a notebook,
    freed when dropped. Build it inside ``styled()``; it draws in a notebook (inline) or saves to a file."""
    return _figure_class()(**kwargs)


@functools.cache
def _figure_class():
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A Figure that Jupyter shows as its PNG, also where pyplot (and with it the inline backend's
        display hook) was never imported."""

        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            with styled():
                self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    return NotebookFigure


def styled():
    """The house style while a figure is built (rcParams are read when artists are created)."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def build_styled(build):
    """Build a figure under the house style (a decorator, so the builders read at one indentation)."""
    import functools

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with styled():
            return build(*args, **kwargs)
    return wrapper


class _Figures:
    """What the figure code uses of pyplot (subplots, get_cmap, close), for figures outside pyplot."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, squeeze: bool = True, **kwargs):
        with styled():
            fig = new_figure(figsize=figsize, layout=layout)
            axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)
            for ax in fig.axes:  # ticks are created lazily, after the style's context: fix the grid's look now
                ax.grid(True, alpha=STYLE["grid.alpha"])
        return fig, axes

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]

    @staticmethod
    def close(fig) -> None:
        """Nothing to release: a figure outside pyplot is freed with its last reference."""


def pyplot() -> _Figures:
    return _Figures()


def save_figure(fig, path: Path) -> Path:
    """Save a figure atomically."""
    # A legend made after subplots() returned, outside the style's context, gets the style's frameless look.
    for legend in [ax.get_legend() for ax in fig.axes] + list(fig.legends):
        if legend is not None:
            legend.set_frame_on(STYLE["legend.frameon"])
    with styled(), rundir.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    return Path(path)
