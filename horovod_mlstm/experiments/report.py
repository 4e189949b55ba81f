"""How the experiments report: results.json, a markdown results.md and PNG figures, each replaced whole.

The transfer suite, the large-batch experiment and the model-size experiment all write these three
kinds of file; this module is the one way they do, so that every table is laid out alike, every
results.json is strict JSON (a diverged run's NaN is written as null) and no reader ever finds
half a file (files.replace_whole).
"""

from __future__ import annotations

import contextlib
import math

from horovod_mlstm import files


def write_results(path: str, value) -> str:
    """results.json: every number of the experiment, strict JSON."""
    return files.write_json(path, value)


def table(header: list[str], rows: list[list], align: str) -> list[str]:
    """Markdown table lines: a column per header cell, ALIGN one letter per column (l left, r right)."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must give l or r for each of the {len(header)} columns")
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_markdown(path: str, lines: list[str]) -> str:
    with files.replace_whole(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def percent(value) -> str:
    """A fraction as a percentage with one decimal; nothing for a missing or non-finite value."""
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str, panels: int = 1, size: tuple[float, float] = (6, 4), dpi: int = 110, sharey: bool = False):
    """Yields (figure, [axes, one per panel side by side]); on a clean exit the figure is laid out and
    saved as the PNG PATH, replaced whole. The figure is closed either way."""
    plt = pyplot()
    fig, axes = plt.subplots(1, panels, figsize=size, sharey=sharey, squeeze=False)
    try:
        yield fig, list(axes[0])
        fig.tight_layout()
        with files.replace_whole(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
