"""Merging LoRA adapters: a registry of methods, each a pure jitted function on adapter trees.

    merged = merging.merge([adapter_1, adapter_2], "ties", [0.7, 0.3], density=0.5)
    params = lora.fold_into_base(base, merged)

These families share the registry `METHODS`:

* `merging.peft`: PEFT's `add_weighted_adapter` (PEFT 0.21 names, parameters and numerics):
  `cat`, `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and the SVD variants
  `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`. The result is an
  adapter whose `scale` is 1.0 (PEFT gives the new adapter `lora_alpha = r`). As in PEFT, a
  single adapter is always merged with `linear`.
* `merging.delta`: methods from the merging literature, on `dW_i = scale_i a_i @ b_i`:
  `task_arithmetic`, `ties_delta`, `dare_delta`, `breadcrumbs`, `knots`. Their `output` is
  "delta" (a delta tree of `{"delta": dW}` nodes) or "factored" (an adapter of rank `rank`,
  by default the largest input rank, `scale` 1.0, from a truncated SVD).
* `merging.spectral`: data-free SVD merges, `iso_c`, `iso_cts` (Marczak et al. 2025) and `tsv`
  (TSV-M, Gargiulo et al. 2025), equal to FusionBench's where the spans have full rank and
  computed in the adapters' span from the stacked factors; same `output`, `rank`, `scale`.
  `merging.wudi`: `wudi` (Cheng et al. 2025), fitted per layer by Adam on the task vectors.
* `merging.core_space`: Core Space (Panariello et al. 2025), `core_<method>` for the delta-space,
  spectral and WUDI methods but `knots` (`core_ties_delta`, `core_tsv`, ...): the method run on
  small (R, R) per-task cores in the SVD bases of the stacked factors (R the sum of the ranks,
  which may differ), mapped back; `core_task_arithmetic` is `task_arithmetic` exactly.

Modules: `registry` (`register`, `merge`, the checks), `peft`, `delta` and `spectral` (the methods),
`targets` (per-target plumbing), `ops` and `factorize` (the array maths). A new method is one
function registered in a module of its own or beside its family; `METHODS` lists PEFT's methods
first, then the delta-space and spectral ones, whichever module is imported first. Learned merges
(`learned.learn_merge`) need a model, heads and images, so they are not in `METHODS`: their
named presets are recipes of `jaxmerge.recipes`, the one name list of every way of merging.

Inputs are factored adapters (`{"lora_a", "lora_b", "scale"}` nodes) over the same targets and
base shapes. Maths runs in float32; factors and deltas come back in the inputs' dtype. SVD
results carry their singular values in `lora_b` and a fixed sign convention
(`merging.factorize.canonical_signs`), so they are reproducible; PEFT keeps LAPACK's arbitrary
signs, which only matters with `svd_clamp` (the clamp quantile is taken over signed entries).
"""

from jaxmerge.merging.registry import METHODS, MergeMethod, merge, register, validate

# Importing the method modules registers them, in this fixed order (PEFT's, then the delta-space
# ones), whichever module of the package a user imports first: Python runs this file before any
# of its submodules.
# isort: off
from jaxmerge.merging import peft
from jaxmerge.merging import delta
from jaxmerge.merging import spectral
from jaxmerge.merging import wudi
from jaxmerge.merging import core_space
# isort: on

__all__ = [
    "METHODS",
    "MergeMethod",
    "merge",
    "register",
    "validate",
    "peft",
    "delta",
    "spectral",
    "wudi",
    "core_space",
]
