"""Plots of a pruning report (they read ``report.json``'s content and never recompute anything)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


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
    for layer in range(layers):
        ax.text(heads - 0.5, layer, f" {int(grid[layer].sum())}", va="center", ha="left", fontsize=8)
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


def plot_head_statistics(
    statistics: dict[str, list[list[float | None]]],
    path: Path,
    columns: int = 3,
    categorical: tuple[str, ...] = (),
) -> Path:
    """One heat map per statistic, each ``[layers, heads]`` (``None`` = not measured, drawn blank), in a grid of
    ``columns`` panels with their own colour scales (for ``cahp analyze``'s per-head tables); the statistics
    named in ``categorical`` (cluster ids) get a qualitative palette."""
    names = list(statistics)
    columns = max(1, min(columns, len(names)))
    rows = (len(names) + columns - 1) // columns
    first = np.array(statistics[names[0]], dtype=float)
    layers, heads = first.shape if first.ndim == 2 else (1, 1)
    width, height = max(3.2, heads * 0.32 + 1.4), max(2.4, layers * 0.3 + 1.0)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        grid = np.ma.masked_invalid(np.array(statistics[name], dtype=float))
        cmap = "tab20" if name in categorical else "viridis"
        image = ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 12)))
        ax.set_yticks(range(0, grid.shape[0], max(1, grid.shape[0] // 12)))
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
