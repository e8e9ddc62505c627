"""Learned merges and head refits: what is fitted by gradient steps on a few images.

    merged, coefficients, history = learned.learn_merge(
        model, base, adapters, heads, images, learned.Settings(objective="output_match"))
    again = learned.rebuild(adapters, coefficients, "core")   # no relearning
    head = learned.refit_head(run, model, backbone)           # a head retrained on a backbone

Modules: `settings` (the frozen `Settings` of a learned merge), `coefficients` (the merged
tree for given coefficients, their JSON form), `fit` (objectives and `learn_merge`), `adam`
(Adam steps in one `lax.scan`, shared by merges and refits) and `refit` (head refit). The named
presets that `evaluate --merge` and the study take are recipes: `jaxmerge.recipes.learned`.
"""

from jaxmerge.learned.coefficients import (
    coefficients_from_json,
    coefficients_to_json,
    core_regmean,
    init_coefficients,
    merged_tree,
    rebuild,
)
from jaxmerge.learned.fit import Head, learn_merge, objective_function, single_outputs
from jaxmerge.learned.refit import refit_head, train_features
from jaxmerge.learned.settings import (
    BASE_MERGES,
    FIELDS,
    GRANULARITIES,
    MATCHES,
    OBJECTIVES,
    Settings,
)

__all__ = [
    "BASE_MERGES",
    "FIELDS",
    "GRANULARITIES",
    "Head",
    "MATCHES",
    "OBJECTIVES",
    "Settings",
    "coefficients_from_json",
    "coefficients_to_json",
    "core_regmean",
    "init_coefficients",
    "learn_merge",
    "merged_tree",
    "objective_function",
    "rebuild",
    "refit_head",
    "single_outputs",
    "train_features",
]
