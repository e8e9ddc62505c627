"""Every score of a study indexed by seed, task and merge, and the normalised score.

Scores are each task's main metric (`heads.HEAD_KINDS`: accuracy, MAE or NME). The
*normalised score* of a merged model on a task compares it with that task's single adapter,
so that 1.0 means "no loss from merging" whatever the metric:
`merged / single` for higher-is-better metrics (accuracy), `single / merged` for errors (MAE,
NME). Every number is a mean over seeds, shown as `mean ± std` (sample std over seeds; a
single seed shows the mean alone).
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxmerge import recipes, similarity, tasks

RELATIONS = ("same images", "similar images", "dissimilar images")


def method_params(config, method: str) -> dict:
    """The keyword parameters of one merge method in the config, as a plain dict."""
    params = config.methods[method]
    return params.to_dict() if hasattr(params, "to_dict") else dict(params)


def main_metric(task: str) -> tuple[str, bool]:
    kind = tasks.get(task).head_kind
    return kind.main_metric, kind.higher_is_better


def normalised(value: float, single: float, task: str) -> float:
    """`value / single` for higher-is-better metrics, `single / value` for errors; NaN when
    the divisor is 0 (a single adapter at 0% accuracy, e.g. a dry run's few fake images)."""
    _, higher = main_metric(task)
    divisor = single if higher else value
    if divisor == 0:
        return float("nan")
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


def mean_or_nan(values) -> float:
    """The mean, ignoring NaN (merges not run); NaN when nothing is left."""
    values = np.asarray(list(values), np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def fmt(values, digits: int = 3) -> str:
    mean, std = mean_std(values)
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


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
        # (seed, method, combo) -> what a learned merge or a head refit cost (seconds, images).
        self.costs = {
            (r["seed"], r["method"], tuple(r["tasks"])): r.get("learned") or r["refit"]
            for r in stages["merges"]
            if "learned" in r or "refit" in r
        }
        # (seed, method, combo) -> {"seconds", "reads"} of every merge that recorded them.
        self.merge_costs = {
            (r["seed"], r["method"], tuple(r["tasks"])): r["cost"]
            for r in stages["merges"]
            if "cost" in r
        }
        self.similarity = {
            (r["seed"], tuple(r["tasks"])): r["similarity"] for r in stages["similarity"]
        }

    def combos(self, size: int) -> list[tuple[str, ...]]:
        return list(itertools.combinations(self.tasks, size))

    @property
    def methods(self) -> list[str]:
        """The methods as the tables list them: the config's, each fusion row (`fused_<gating>`,
        not a merge: the adapters stay apart, see `jaxmerge.fusion`), then each head refit."""
        refits = [f"{m}+refit" for m in self.config.get("refit_methods", ())]
        return list(self.config.methods) + self.fused + refits

    @property
    def fused(self) -> list[str]:
        return [f"fused_{gating}" for gating in self.config.get("fusion", {})]

    def has(self, seed, method, combo) -> bool:
        """Whether the merge was run (a method may run on some sizes only)."""
        return (seed, method, tuple(combo)) in self.merged

    def merged_values(self, seed, method, task, size) -> list[float]:
        """The task's scores in every merge of `size` tasks that contains it (one seed)."""
        return [
            self.merged[seed, method, c][task]
            for c in self.combos(size)
            if task in c and self.has(seed, method, c)
        ]

    def normalised_merge(self, seed, method, combo) -> float:
        """Mean over the merge's tasks of the normalised score (NaN for a merge not run)."""
        if not self.has(seed, method, combo):
            return float("nan")
        values = self.merged[seed, method, combo]
        return float(np.mean([normalised(values[t], self.single[seed, t], t) for t in combo]))

    def per_seed(self, fn) -> list[float]:
        return [fn(seed) for seed in self.seeds]

    def normalised_by_seed(self, method, size) -> list[float]:
        """Per seed, the mean normalised score of the method's merges of `size` tasks."""
        return [
            mean_or_nan([self.normalised_merge(seed, method, c) for c in self.combos(size)])
            for seed in self.seeds
        ]


def beats_head(s: Scores, seed, method, size) -> float:
    """Fraction of (merge, task) scores at least as good as that task's head finetuning."""
    wins = []
    for combo in (c for c in s.combos(size) if s.has(seed, method, c)):
        for task in combo:
            value, head = s.merged[seed, method, combo][task], s.head[seed, task]
            wins.append(value >= head if main_metric(task)[1] else value <= head)
    return mean_or_nan(wins)


def similarity_rows(s: Scores) -> list[dict]:
    """Per pair: its measures and merge quality, each a list over seeds."""
    rows = []
    methods = [m for m in s.config.methods if recipes.get(m).reads == "none"]  # data-free
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
