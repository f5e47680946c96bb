"""Plots of a pruning report (they read ``report.json``'s content and never recompute anything)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker


def plot_mss_curve(selection: dict[str, Any], path: Path) -> Path:
    """MSS(k) with the fitted polynomial, the knee, and the k actually used (nothing for a selection without an
    MSS curve)."""
    knee = selection.get("knee") or {}
    if not knee.get("ks"):
        return path  # a scorer + budget selection has no MSS curve
    ks, mss, fitted = np.array(knee["ks"]), np.array(knee["mss"]), np.array(knee["fitted"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ks, mss, "o", ms=3, color="#4c72b0", label="MSS(k)")
    ax.plot(ks, fitted, "-", color="#dd8452", label=f"polynomial fit (degree {knee['degree']})")
    how = "knee" if knee["method"] == "kneedle" else f"fallback: {knee['fallback']}"
    ax.axvline(knee["k"], color="#c44e52", ls="--", label=f"k* = {knee['k']} ({how})")
    if selection["k"] != knee["k"]:
        ax.axvline(selection["k"], color="#55a868", ls=":", label=f"budget k = {selection['k']}")
    ax.set_xlabel("number of clusters k (= heads kept)")
    ax.set_ylabel("mean simplified silhouette")
    ax.set_title("CAHP: how many heads to keep")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kept_heads(kept_heads_by_layer: dict[str, list[int]], heads: int, path: Path, title: str) -> Path:
    """The layers x heads map of kept (filled) and removed (empty) heads."""
    layers = len(kept_heads_by_layer)
    grid = np.zeros((layers, heads))
    for layer, kept in kept_heads_by_layer.items():
        grid[int(layer), kept] = 1
    fig, ax = plt.subplots(figsize=(max(4, heads * 0.45), max(2.5, layers * 0.4)))
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.3, aspect="auto")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xticks(np.arange(-0.5, heads), minor=True)
    ax.set_yticks(np.arange(-0.5, layers), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for row in range(layers):
        ax.text(heads - 0.5, row, f" {int(grid[row].sum())}", va="center", ha="left", fontsize=8)
    ax.set_title(f"{title}: {int(grid.sum())} of {grid.size} heads kept", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head_space(selection: dict[str, Any], heads: int, path: Path) -> Path:
    """The 2-D head space coloured by cluster, kept heads circled and labelled ``layer.head`` (CAHP only: a
    selection without a 2-D embedding draws nothing)."""
    points = np.array(selection.get("embedding", []))
    if points.ndim != 2 or points.shape[1] != 2:
        return path
    clusters = np.array(selection["clusters"])
    kept = {(int(layer), h) for layer, hs in selection["kept_heads_by_layer"].items() for h in hs}
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(points[:, 0], points[:, 1], c=clusters, cmap="tab20", s=22, alpha=0.85)
    for index, (x, y) in enumerate(points):
        layer, head = divmod(index, heads)
        if (layer, head) in kept:
            ax.scatter([x], [y], s=110, facecolors="none", edgecolors="black", linewidths=1.2)
            ax.annotate(f"{layer}.{head}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"head space ({len(kept)} kept heads circled, colour = cluster)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class DistinctTickFormatter(ticker.Formatter):
    """Tick labels with the fewest significant digits (at least 2) that tell the ticks apart, each label whole:
    no offset or ``1e-5`` multiplier drawn above the axis, where it would overprint a panel's title."""

    def __init__(self) -> None:
        self.digits = 2

    def set_locs(self, locs: Any) -> None:
        """Choose the digits for the ticks ``locs`` (the axis calls this before labelling them)."""
        super().set_locs(locs)
        values = [float(value) for value in locs]
        self.digits = next(
            (digits for digits in range(2, 10) if len({f"{v:.{digits}g}" for v in values}) == len(values)), 10
        )

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.{self.digits}g}".replace("e+0", "e").replace("e-0", "e-")


#: Colours of categorical panels (cluster ids): tab20, then tab20b and tab20c, 60 in all (then repeated).
_CATEGORY_COLOURS = [
    colour
    for name in ("tab20", "tab20b", "tab20c")
    for colour in plt.get_cmap(name).colors  # type: ignore[attr-defined]  # a ListedColormap's list of colours
]
#: Above this many cells a categorical panel does not print its ids inside the cells.
_MAX_LABELLED_CELLS = 400


def _categorical_panel(fig: Any, ax: Any, grid: np.ma.MaskedArray) -> None:
    """Draw ``grid`` (``[layers, heads]`` category ids, masked = not measured) with one colour per id and a
    colour bar of separate swatches, each labelled with its id; the ids are also printed in the cells."""
    ids = np.unique(grid.compressed()).astype(int) if grid.count() else np.array([0])
    index = np.ma.masked_array(np.searchsorted(ids, grid.filled(ids[0]).astype(int)), mask=np.ma.getmaskarray(grid))
    colours = [_CATEGORY_COLOURS[i % len(_CATEGORY_COLOURS)] for i in range(len(ids))]
    cmap = matplotlib.colors.ListedColormap(colours)
    norm = matplotlib.colors.BoundaryNorm(np.arange(len(ids) + 1) - 0.5, len(ids))
    image = ax.imshow(index, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    step = max(1, int(np.ceil(len(ids) / 20)))  # at most about 20 labels on the bar
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=np.arange(0, len(ids), step))
    bar.ax.set_yticklabels([str(ids[i]) for i in range(0, len(ids), step)])
    bar.ax.tick_params(labelsize=7, length=0)
    bar.ax.minorticks_off()
    if grid.size <= _MAX_LABELLED_CELLS:
        for (layer, head), value in np.ndenumerate(grid.filled(-1)):
            if not np.ma.getmaskarray(grid)[layer, head]:
                red, green, blue = matplotlib.colors.to_rgb(colours[int(index[layer, head])])
                ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(head, layer, str(int(value)), ha="center", va="center", fontsize=6, color=ink)


def plot_head_statistics(
    statistics: dict[str, list[list[float | None]]],
    path: Path,
    columns: int = 3,
    categorical: tuple[str, ...] = (),
) -> Path:
    """Save :func:`head_statistics_figure` as a PNG at ``path``."""
    fig = head_statistics_figure(statistics, columns, categorical)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def head_statistics_figure(
    statistics: dict[str, list[list[float | None]]], columns: int = 3, categorical: tuple[str, ...] = ()
) -> Any:
    """One heat map per statistic, each ``[layers, heads]`` (``None`` = not measured, drawn blank), in a grid of
    ``columns`` panels with their own colour scales (for ``cahp analyze``'s per-head tables). The statistics
    named in ``categorical`` (cluster ids) get one colour per id, a bar of labelled swatches and the ids in the
    cells; the others a continuous scale whose labels carry no offset or multiplier.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    names = list(statistics)
    columns = max(1, min(columns, len(names)))
    rows = (len(names) + columns - 1) // columns
    first = np.array(statistics[names[0]], dtype=float)
    layers, heads = first.shape if first.ndim == 2 else (1, 1)
    width, height = max(3.4, heads * 0.32 + 1.8), max(2.6, layers * 0.3 + 1.2)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        grid = np.ma.masked_invalid(np.array(statistics[name], dtype=float))
        title = name.replace("_", " ")
        if name in categorical:
            _categorical_panel(fig, ax, grid)
            count = len(np.unique(grid.compressed()))
            title += f" ({count} {'clusters' if 'cluster' in name else 'ids'})"
        else:
            image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
            bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, format=DistinctTickFormatter())
            bar.ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 12)))
        ax.set_yticks(range(0, grid.shape[0], max(1, grid.shape[0] // 12)))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_layer_divergence(adjacent_layers: list[dict[str, Any]], path: Path) -> Path:
    """KL and Jensen-Shannon divergence of each layer's head-averaged maps from the previous layer's (low =
    the layer repeats the one before); nothing for a model of one layer."""
    if not adjacent_layers:
        return path
    labels = [f"{pair['layers'][0]}→{pair['layers'][1]}" for pair in adjacent_layers]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("kl", "js"), ("KL(P_l || P_l-1)", "JS divergence (max ln 2)"), strict=True):
        values = np.array([np.nan if pair[key] is None else pair[key] for pair in adjacent_layers], dtype=float)
        ax.plot(x, values, "o-", color="#4c72b0")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("layers")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].axhline(np.log(2), color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
