"""The PNG plots of the report: a heatmap per method, the baselines, the normalised score
against the number of merged adapters, similarity."""

from __future__ import annotations

import itertools
import os

import numpy as np

from experiments.report.scores import RELATIONS, Scores, mean_or_nan, normalised, similarity_rows
from jaxmerge import extras, similarity


def plots(s: Scores, directory: str) -> dict[str, str]:
    """Writes the PNGs; returns {name: path}."""
    extras.require("matplotlib").use("Agg")
    plt = extras.require("matplotlib.pyplot")

    config, paths = s.config, {}
    n = len(s.tasks)
    if 2 in config.merge_sizes:
        for method in s.methods:
            matrix = np.full((n, n), np.nan)
            for (i, a), (j, b) in itertools.permutations(enumerate(s.tasks), 2):
                pair = tuple(t for t in s.tasks if t in (a, b))
                matrix[i, j] = mean_or_nan(
                    normalised(s.merged[seed, method, pair][a], s.single[seed, a], a)
                    for seed in s.seeds
                    if s.has(seed, method, pair)
                )
            fig, ax = plt.subplots(figsize=(6.5, 5.5))
            image = ax.imshow(matrix, cmap="RdYlGn", vmin=0.5, vmax=1.1)
            for i, j in itertools.product(range(n), range(n)):
                if not np.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(n), s.tasks, rotation=40, ha="right")
            ax.set_yticks(range(n), s.tasks)
            ax.set_xlabel("merged with")
            ax.set_ylabel("task scored")
            ax.set_title(f"{method}: pair merges, normalised (1 = single adapter)", fontsize=10)
            fig.colorbar(image, ax=ax)
            fig.tight_layout()
            paths[f"heatmap_{method}"] = _save(fig, directory, f"heatmap_{method}.png")

    methods = s.methods
    cols = 4
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    x = np.arange(n)
    bars = [("head finetuning", None), *((f"{k}-task merges", k) for k in config.merge_sizes)]
    width = 0.8 / len(bars)
    for ax, method in zip(axes.flat, methods):
        for b, (name, size) in enumerate(bars):
            values = []
            for task in s.tasks:
                if size is None:
                    v = [normalised(s.head[sd, task], s.single[sd, task], task) for sd in s.seeds]
                else:
                    v = [
                        mean_or_nan(
                            normalised(x, s.single[sd, task], task)
                            for x in s.merged_values(sd, method, task, size)
                        )
                        for sd in s.seeds
                    ]
                values.append(v)
            means = [np.mean(v) for v in values]
            errs = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
            ax.bar(x + (b - (len(bars) - 1) / 2) * width, means, width, yerr=errs, label=name)
        ax.axhline(1.0, color="black", lw=1, ls="--", label="single adapter")
        ax.set_title(method)
        ax.set_xticks(x, s.tasks, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.3)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("normalised score")
    # One legend for the figure, above the panels: inside a panel it covered bars.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8)
    fig.suptitle("Merged models against a single adapter (1.0) and head finetuning", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    paths["baselines"] = _save(fig, directory, "baselines.png")

    if len(config.merge_sizes) > 2:
        paths["scaling"] = _scaling(s, plt, directory)

    if 2 in config.merge_sizes:
        sim = similarity_rows(s)
        measures = list(similarity.MEASURES)
        fig, axes = plt.subplots(1, len(measures), figsize=(4.5 * len(measures), 4), squeeze=False)
        colors = dict(zip(RELATIONS, ("tab:red", "tab:orange", "tab:blue")))
        for ax, measure in zip(axes.flat, measures):
            for rel in RELATIONS:
                group = [r for r in sim if r["relation"] == rel]
                ax.scatter(
                    [np.mean(r[measure]) for r in group],
                    [np.mean(r["all"]) for r in group],
                    color=colors[rel],
                    label=rel,
                )
            xs = [np.mean(r[measure]) for r in sim]
            ys = [np.mean(r["all"]) for r in sim]
            ax.set_title(
                f"{measure}: Spearman {similarity.rank_correlation(xs, ys):+.2f}", fontsize=10
            )
            ax.set_xlabel(measure)
        axes.flat[0].set_ylabel("normalised score of the pair (mean of methods)")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        paths["similarity"] = _save(fig, directory, "similarity.png")
    return paths


def _scaling(s: Scores, plt, directory) -> str:
    """Normalised score against the number of merged adapters, a line per method (mean over
    seeds of each seed's mean over every merge of that size; bars: spread over seeds)."""
    sizes = sorted(s.config.merge_sizes)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in s.methods:
        per_size = [s.normalised_by_seed(method, k) for k in sizes]
        means = np.array([mean_or_nan(v) for v in per_size])
        if np.isnan(means).all():
            continue
        errs = [np.nanstd(v, ddof=1) if np.sum(~np.isnan(v)) > 1 else 0.0 for v in per_size]
        ax.errorbar(sizes, means, yerr=errs, marker="o", capsize=3, label=method)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(sizes)
    ax.set_xlabel("adapters merged")
    ax.set_ylabel("normalised score (1 = single adapters)")
    ax.set_title("Merging more adapters: every method, every size", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    return _save(fig, directory, "scaling.png")


def _save(fig, directory, name) -> str:
    plt = extras.require("matplotlib.pyplot")
    path = os.path.join(directory, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
