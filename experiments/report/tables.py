"""The markdown tables of the report (see experiments/README.md for what each shows)."""

from __future__ import annotations

import itertools

import numpy as np

from experiments.report.scores import (
    RELATIONS,
    Scores,
    beats_head,
    fmt,
    main_metric,
    mean_or_nan,
    relation,
    similarity_rows,
)
from jaxmerge import similarity


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _task_rows(s: Scores, methods, sizes) -> list[list[str]]:
    rows = []
    for task in s.tasks:
        metric, higher = main_metric(task)
        row = [task, f"{metric} {'↑' if higher else '↓'}"]
        for table in (s.single, s.head, s.removed):
            row.append(fmt([table[seed, task] for seed in s.seeds]))
        for method, size in itertools.product(methods, sizes):
            row.append(
                fmt([mean_or_nan(s.merged_values(seed, method, task, size)) for seed in s.seeds])
            )
        rows.append(row)
    return rows


def cost_table(s: Scores, sizes, label) -> str:
    """Seconds per learned merge or head refit (2 CPU cores here) and the images it used."""
    header = ["method", "merges", "seconds per merge", "unlabeled images / task"]
    header += ["labeled examples / task", "adapted on"]
    rows = []
    for method in s.methods:
        for k in sizes:
            found = {key: c for key, c in s.costs.items() if key[1] == method and len(key[2]) == k}
            if not found:
                continue
            per_seed = [
                mean_or_nan(c["seconds"] for key, c in found.items() if key[0] == seed)
                for seed in s.seeds
            ]
            first = next(iter(found.values()))
            refit = "steps" in first
            unlabeled = "-" if refit else first["images_per_task"]
            labeled = "all of the training split" if refit else first["labeled_per_task"]
            split = "train split" if refit else ", ".join(first["split"]) + " split"
            rows.append([method, label(k), fmt(per_seed, 1), unlabeled, labeled, split])
    return markdown_table(header, rows)


def score_and_cost_table(s: Scores, sizes, label) -> str:
    """Each method's normalised score beside its seconds per merge and the images it reads."""
    header = ["method", "reads images"]
    for k in sizes:
        header += [f"normalised, {label(k)}", f"seconds per merge, {label(k)}"]
    rows = []
    for method in list(s.config.methods) + s.fused:
        costs = {key: c for key, c in s.merge_costs.items() if key[1] == method}
        reads = next(iter(costs.values()))["reads"] if costs else "n/a"
        row = [method, reads]
        for k in sizes:
            seconds = [
                mean_or_nan(
                    c["seconds"] for key, c in costs.items() if key[0] == seed and len(key[2]) == k
                )
                for seed in s.seeds
            ]
            row += [fmt(s.normalised_by_seed(method, k)), fmt(seconds, 2)]
        rows.append(row)
    return markdown_table(header, rows)


def fusion_cost_table(s: Scores, label) -> str:
    """Each fusion row's score beside its fit and its eval cost per image against the `cat`
    merge of the same tasks folded into the base (one forward)."""
    header = ["fusion", "tasks", "normalised", "fit seconds", "fused ms / image"]
    header += ["merged ms / image", "fused / merged"]
    rows = []
    for method in s.fused:
        for k in s.config.get("fusion_sizes", s.config.merge_sizes):
            runs = {key: c for key, c in s.merge_costs.items() if key[1] == method}
            per_seed = [
                [c for key, c in runs.items() if key[0] == seed and len(key[2]) == k]
                for seed in s.seeds
            ]
            if not any(per_seed):
                continue
            by_seed = {
                field: [mean_or_nan(c[field] for c in costs) for costs in per_seed]
                for field in ("seconds", "fused_ms_per_image", "merged_ms_per_image")
            }
            fused, merged = by_seed["fused_ms_per_image"], by_seed["merged_ms_per_image"]
            rows.append(
                [method, label(k), fmt(s.normalised_by_seed(method, k))]
                + [fmt(by_seed["seconds"], 1), fmt(fused, 3), fmt(merged, 3)]
                + [fmt([f / m for f, m in zip(fused, merged)], 2)]
            )
    return markdown_table(header, rows)


def tables(s: Scores) -> dict[str, str]:
    """{name: markdown} of every table (see experiments/README.md for what each shows)."""
    config, out = s.config, {}
    methods, sizes = s.methods, list(config.merge_sizes)
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
            row.append(fmt(s.normalised_by_seed(method, k)))
        for k in sizes:
            row.append(fmt(s.per_seed(lambda seed, k=k, m=method: beats_head(s, seed, m, k)), 2))
        rows.append(row)
    out["normalised_by_method"] = markdown_table(header, rows)
    if s.merge_costs:
        out["score_and_cost"] = score_and_cost_table(s, sizes, label)
    if s.costs:
        out["learned_cost"] = cost_table(s, sizes, label)
    if s.fused:
        out["fusion_cost"] = fusion_cost_table(s, label)

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
        header.append("normalised (mean of fixed methods)")
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
            for target, name in (("main", config.main_method), ("all", "mean of fixed methods")):
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
        header = ["images", "pairs", f"normalised ({config.main_method})", "mean of fixed methods"]
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
