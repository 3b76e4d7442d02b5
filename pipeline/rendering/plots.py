"""Line and bar charts as PNG files, drawn off-screen with matplotlib: ``report``'s loss, validation and recall
figures. One colour per run, in the order the runs were given."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

# A colour per run, in order (the qualitative "tab10" palette's RGB values).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _colour(i: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in PALETTE[i % len(PALETTE)])  # type: ignore[return-value]


def _save(fig, path: Path | str) -> None:
    fig.savefig(str(path), format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def render_lines_png(series: Sequence[tuple[str, Sequence[float | None]]], path: Path | str, title: str,
                     xlabel: str = "epoch", ylabel: str | None = None, width: int = 900, height: int = 420,
                     styles: Sequence[tuple[int, str]] | None = None, ylim: tuple[float, float] | None = None) -> None:
    """One line per ``(name, values)`` (value ``k`` at x = k + 1; None values are gaps) on shared axes.
    ``styles[i]`` = (colour index, line style) of series ``i`` (default: its own colour, solid)."""
    values = [v for _, ys in series for v in ys if v is not None and math.isfinite(v)]
    if not values:
        raise ValueError(f"nothing to plot for {title!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width / 100, height / 100))
    for i, (name, ys) in enumerate(series):
        colour, style = styles[i] if styles else (i, "-")
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, [math.nan if v is None else v for v in ys], style, color=_colour(colour), linewidth=2,
                marker="o", markersize=3, label=name)
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, color="0.9")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=min(len(series), 3), frameon=False)
    _save(fig, path)


def render_bars_png(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], path: Path | str,
                    title: str, vmax: float = 1.0, height: int = 360,
                    chance: Sequence[Sequence[float | None]] | None = None) -> None:
    """Grouped bars on a fixed ``0..vmax`` scale: one group per name in ``groups``, one bar per series in each
    (its value on top; a missing value leaves a gap). ``chance[i][g]``: the chance level of series ``i``'s bar in
    group ``g``, drawn as a dashed black line across that bar."""
    plt = _pyplot()
    bar = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 + len(groups) * (0.35 * len(series) + 0.5)), height / 100))
    drew_chance = False
    for i, (name, values) in enumerate(series):
        for g, value in enumerate(values):
            x = g - 0.4 + bar * (i + 0.5)
            if value is not None and math.isfinite(value):
                ax.bar(x, min(max(value, 0.0), vmax), bar * 0.9, color=_colour(i), label=name if g == 0 else None)
                ax.annotate(f"{value:.2f}"[1:] if 0 <= value < 1 else f"{value:.1f}", (x, min(max(value, 0), vmax)),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            level = chance[i][g] if chance else None
            if level is not None and math.isfinite(level):
                ax.hlines(level, x - bar / 2, x + bar / 2, colors="black", linestyles="--", linewidth=1.2,
                          label=None if drew_chance else "chance")
                drew_chance = True
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, vmax * 1.08)
    ax.set_title(title, loc="left")
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(labels), 4),
              frameon=False)
    _save(fig, path)
