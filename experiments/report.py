"""The study's report: markdown tables, PNG plots and every raw number as JSONL.

Scores are each task's main metric (`heads.HEAD_KINDS`: accuracy, MAE or NME). The
*normalised score* of a merged model on a task compares it with that task's single adapter,
so that 1.0 means "no loss from merging" whatever the metric:
`merged / single` for higher-is-better metrics (accuracy), `single / merged` for errors (MAE,
NME). Every number is a mean over seeds, shown as `mean ± std` (sample std over seeds; a
single seed shows the mean alone).
"""

from __future__ import annotations

import itertools
import json
import os
import platform

import jax
import numpy as np

from jaxmerge import similarity, tasks

RELATIONS = ("same images", "similar images", "dissimilar images")


def method_params(config, method: str) -> dict:
    """The keyword parameters of one merge method in the config, as a plain dict."""
    params = config.methods[method]
    return params.to_dict() if hasattr(params, "to_dict") else dict(params)


def main_metric(task: str) -> tuple[str, bool]:
    kind = tasks.get(task).head_kind
    return kind.main_metric, kind.higher_is_better


def normalised(value: float, single: float, task: str) -> float:
    """`value / single` for higher-is-better metrics, `single / value` for errors."""
    _, higher = main_metric(task)
    return value / single if higher else single / value


def relation(config, a: str, b: str) -> str:
    """How two tasks' images relate: one dataset, one image group, or neither."""
    if tasks.get(a).dataset == tasks.get(b).dataset:
        return RELATIONS[0]
    groups = config.image_groups
    return RELATIONS[1] if groups.get(a, a) == groups.get(b, b) else RELATIONS[2]


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(list(values), np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def fmt(values, digits: int = 3) -> str:
    mean, std = mean_std(values)
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Scores:
    """Main-metric values indexed for the tables: per seed, task, and merge."""

    def __init__(self, config, training, stages):
        self.config = config
        self.seeds = list(config.seeds)
        self.tasks = list(config.tasks)
        self.single, self.head, self.removed = {}, {}, {}
        for r in training:
            metric = main_metric(r["task"])[0]
            target = self.single if r["mode"] == "lora" else self.head
            target[r["seed"], r["task"]] = r["result"][metric]
        for r in stages["no_adapter"]:
            (task,) = r["tasks"]
            self.removed[r["seed"], task] = r["scores"][task][main_metric(task)[0]]
        self.merged = {}  # (seed, method, combo) -> {task: value}
        for r in stages["merges"]:
            values = {t: s[main_metric(t)[0]] for t, s in r["scores"].items()}
            self.merged[r["seed"], r["method"], tuple(r["tasks"])] = values
        self.similarity = {
            (r["seed"], tuple(r["tasks"])): r["similarity"] for r in stages["similarity"]
        }

    def combos(self, size: int) -> list[tuple[str, ...]]:
        return list(itertools.combinations(self.tasks, size))

    def merged_values(self, seed, method, task, size) -> list[float]:
        """The task's scores in every merge of `size` tasks that contains it (one seed)."""
        return [self.merged[seed, method, c][task] for c in self.combos(size) if task in c]

    def normalised_merge(self, seed, method, combo) -> float:
        """Mean over the merge's tasks of the normalised score."""
        values = self.merged[seed, method, combo]
        return float(np.mean([normalised(values[t], self.single[seed, t], t) for t in combo]))

    def per_seed(self, fn) -> list[float]:
        return [fn(seed) for seed in self.seeds]


def _task_rows(s: Scores, methods, sizes) -> list[list[str]]:
    rows = []
    for task in s.tasks:
        metric, higher = main_metric(task)
        row = [task, f"{metric} {'↑' if higher else '↓'}"]
        for table in (s.single, s.head, s.removed):
            row.append(fmt([table[seed, task] for seed in s.seeds]))
        for method, size in itertools.product(methods, sizes):
            row.append(
                fmt([np.mean(s.merged_values(seed, method, task, size)) for seed in s.seeds])
            )
        rows.append(row)
    return rows


def tables(s: Scores) -> dict[str, str]:
    """{name: markdown} of every table (see experiments/README.md for what each shows)."""
    config, out = s.config, {}
    methods, sizes = list(config.methods), list(config.merge_sizes)
    size_name = {2: "pairs", 3: "triples"}
    label = lambda k: size_name.get(k, f"{k}-merges")
    base = ["task", "metric", "single adapter", "head finetuning", "adapter removed"]

    header = base + [f"{config.main_method}, {label(k)}" for k in sizes]
    out["main"] = markdown_table(header, _task_rows(s, [config.main_method], sizes))
    for k in sizes:
        header = base + methods
        out[f"per_task_{label(k)}"] = markdown_table(header, _task_rows(s, methods, [k]))

    header = ["method"] + [f"normalised, {label(k)}" for k in sizes]
    header += [f"beats head finetuning, {label(k)}" for k in sizes]
    rows = []
    for method in methods:
        row = [method]
        for k in sizes:
            row.append(
                fmt(
                    s.per_seed(
                        lambda seed, k=k, m=method: np.mean(
                            [s.normalised_merge(seed, m, c) for c in s.combos(k)]
                        )
                    )
                )
            )
        for k in sizes:
            row.append(fmt(s.per_seed(lambda seed, k=k, m=method: beats_head(s, seed, m, k)), 2))
        rows.append(row)
    out["normalised_by_method"] = markdown_table(header, rows)

    for k in sizes:
        header = ["tasks", "images" if k == 2 else "closest pair's images"] + methods
        rows = []
        for combo in s.combos(k):
            rel = min(
                (relation(config, a, b) for a, b in itertools.combinations(combo, 2)),
                key=RELATIONS.index,
            )
            row = [" + ".join(combo), rel]
            row += [
                fmt(s.per_seed(lambda seed, m=m, c=combo: s.normalised_merge(seed, m, c)))
                for m in methods
            ]
            rows.append(row)
        out[f"normalised_{label(k)}"] = markdown_table(header, rows)

    if 2 in sizes:
        sim = similarity_rows(s)
        header = ["pair", "images", *similarity.MEASURES, f"normalised ({config.main_method})"]
        header.append("normalised (mean of methods)")
        rows = [
            [" + ".join(r["pair"]), r["relation"]]
            + [fmt(r[m]) for m in similarity.MEASURES]
            + [fmt(r["main"]), fmt(r["all"])]
            for r in sim
        ]
        out["similarity"] = markdown_table(header, rows)
        header = ["similarity measure", "merge quality", "Pearson r", "Spearman rho", "pairs"]
        rows = []
        for measure in similarity.MEASURES:
            for target, name in (("main", config.main_method), ("all", "mean of methods")):
                x = [np.mean(r[measure]) for r in sim]
                y = [np.mean(r[target]) for r in sim]
                rows.append(
                    [
                        measure,
                        f"normalised ({name})",
                        f"{similarity.pearson(x, y):+.2f}",
                        f"{similarity.rank_correlation(x, y):+.2f}",
                        len(sim),
                    ]
                )
        out["similarity_correlation"] = markdown_table(header, rows)
        header = ["images", "pairs", f"normalised ({config.main_method})", "mean of methods"]
        rows = []
        for rel in RELATIONS:
            group = [r for r in sim if r["relation"] == rel]
            if group:
                rows.append(
                    [
                        rel,
                        len(group),
                        fmt(
                            s.per_seed(
                                lambda seed, g=group: np.mean([r["by_seed"][seed] for r in g])
                            )
                        ),
                        fmt(
                            s.per_seed(
                                lambda seed, g=group: np.mean([r["by_seed_all"][seed] for r in g])
                            )
                        ),
                    ]
                )
        out["relation"] = markdown_table(header, rows)
    return out


def beats_head(s: Scores, seed, method, size) -> float:
    """Fraction of (merge, task) scores at least as good as that task's head finetuning."""
    wins = []
    for combo in s.combos(size):
        for task in combo:
            value, head = s.merged[seed, method, combo][task], s.head[seed, task]
            wins.append(value >= head if main_metric(task)[1] else value <= head)
    return float(np.mean(wins))


def similarity_rows(s: Scores) -> list[dict]:
    """Per pair: its measures and merge quality, each a list over seeds."""
    rows = []
    methods = list(s.config.methods)
    for pair in s.combos(2):
        row = {"pair": pair, "relation": relation(s.config, *pair)}
        for measure in similarity.MEASURES:
            row[measure] = s.per_seed(lambda seed, p=pair, m=measure: s.similarity[seed, p][m])
        row["by_seed"] = {
            seed: s.normalised_merge(seed, s.config.main_method, pair) for seed in s.seeds
        }
        row["by_seed_all"] = {
            seed: np.mean([s.normalised_merge(seed, m, pair) for m in methods]) for seed in s.seeds
        }
        row["main"], row["all"] = list(row["by_seed"].values()), list(row["by_seed_all"].values())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- plots


def plots(s: Scores, directory: str) -> dict[str, str]:
    """Writes the PNGs; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, paths = s.config, {}
    n = len(s.tasks)
    if 2 in config.merge_sizes:
        for method in config.methods:
            matrix = np.full((n, n), np.nan)
            for (i, a), (j, b) in itertools.permutations(enumerate(s.tasks), 2):
                pair = tuple(t for t in s.tasks if t in (a, b))
                matrix[i, j] = np.mean(
                    [
                        normalised(s.merged[seed, method, pair][a], s.single[seed, a], a)
                        for seed in s.seeds
                    ]
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

    methods = list(config.methods)
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
                        np.mean(
                            [
                                normalised(x, s.single[sd, task], task)
                                for x in s.merged_values(sd, method, task, size)
                            ]
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
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Merged models against a single adapter (1.0) and head finetuning")
    fig.tight_layout()
    paths["baselines"] = _save(fig, directory, "baselines.png")

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


def _save(fig, directory, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(directory, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def write(config, workdir: str, training, stages, seconds: float) -> dict[str, str]:
    """Writes report/{tables.md, main_table.md, raw.jsonl, *.png}; returns {name: path}."""
    directory = os.path.join(workdir, "report")
    os.makedirs(directory, exist_ok=True)
    s = Scores(config, training, stages)
    made = tables(s)
    train_cfg = config.train
    meta = {
        "suite": config.suite,
        "seeds": list(config.seeds),
        "tasks": list(config.tasks),
        "methods": {m: method_params(config, m) for m in config.methods},
        "merge_weight": config.merge_weight,
        "lora": {"rank": train_cfg.lora.rank, "alpha": train_cfg.lora.alpha,
                 "targets": train_cfg.lora.targets},
        "learning_rate": train_cfg.learning_rate,
        "steps": train_cfg.steps,
        "batch_size": train_cfg.batch_size,
        "base": {"source": train_cfg.base.source, "path": os.path.basename(train_cfg.base.path)},
        "machine": machine(),
        "invocation_seconds": round(seconds, 1),
        "train_seconds": round(sum(r["seconds"] for r in training), 1),
    }  # fmt: skip
    titles = {
        "main": f"Main table: each task's metric, {config.main_method} merges",
        "per_task_pairs": "Each task inside pair merges (mean over its partners), per method",
        "per_task_triples": "Each task inside triple merges (mean over its partners), per method",
        "normalised_by_method": "Normalised score per method (merged / single adapter)",
        "normalised_pairs": "Normalised score of each pair merge, per method",
        "normalised_triples": "Normalised score of each triple merge, per method",
        "similarity": "Adapter similarity beside the pair's merge quality",
        "similarity_correlation": "Correlation of similarity and merge quality over pairs",
        "relation": "Merge quality by how alike the two tasks' images are",
    }
    settings = (
        f"Suite `{config.suite}`, seeds {list(config.seeds)}, LoRA rank {train_cfg.lora.rank} "
        f"(alpha {train_cfg.lora.alpha}, targets `{train_cfg.lora.targets}`), learning rate "
        f"{train_cfg.learning_rate}, {train_cfg.steps} steps of batch {train_cfg.batch_size} "
        f"for adapters and heads alike, merge weight {config.merge_weight}, methods "
        + ", ".join(f"`{m}` {method_params(config, m) or ''}".strip() for m in config.methods)
        + f". This invocation took {seconds / 60:.1f} min on {meta['machine']['cpu_count']} CPU "
        f"cores ({meta['machine']['processor']}); stages cached in the workdir by earlier "
        "invocations were read back, not rerun.\n"
    )
    text = "# Study report\n\n" + settings + "\n" + (__doc__.split("\n\n", 1)[1]) + "\n"
    for name, table in made.items():
        text += f"## {titles.get(name, name)}\n\n{table}\n"
    paths = {"tables": os.path.join(directory, "tables.md")}
    with open(paths["tables"], "w") as f:
        f.write(text)
    paths["main_table"] = os.path.join(directory, "main_table.md")
    with open(paths["main_table"], "w") as f:
        f.write(f"{titles['main']}\n\n{made['main']}")
    paths.update(plots(s, directory))

    paths["raw"] = os.path.join(directory, "raw.jsonl")
    with open(paths["raw"], "w") as f:
        f.write(json.dumps({"kind": "meta", **meta}) + "\n")
        for r in training:
            f.write(json.dumps({"kind": "train", **r}) + "\n")
        for name, records in stages.items():
            for r in records:
                f.write(json.dumps({"kind": name, **r}) + "\n")
    return paths
