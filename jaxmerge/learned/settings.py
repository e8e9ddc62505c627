"""The settings of a learned merge: one frozen, validated dataclass, also the static argument
under `jit` (it is hashable), of which the named presets are instances."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

OBJECTIVES = ("entropy", "output_match", "supervised")
GRANULARITIES = ("task", "layer", "rank", "core")
BASE_MERGES = ("task_arithmetic", "ties")
MATCHES = ("kl", "mse")
STARTS = ("sum", "regmean")


def _integer(field, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")


def _choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field}: got {value!r}; allowed: one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a learned merge fits its coefficients (see `jaxmerge.learned.fit`).

    objective: "entropy", "output_match" or "supervised".
    granularity: one coefficient per "task", per "layer", per rank-one component ("rank"), or
      a full mixing matrix of the stacked factors per layer ("core"; task arithmetic only).
    base_merge: "task_arithmetic" or "ties" (AdaMerging++: TIES-processed task vectors).
    density: the fraction of each task vector TIES keeps.
    steps, learning_rate, batch_size: Adam steps, step size, images per task per step.
    cosine: decay the step size to 0 along a cosine over the steps.
    init: the starting value of every coefficient (1.0 = the plain sum of the adapters).
    start: "sum" (every coefficient at `init`) or "regmean" ("core" only: the mixing matrices
      start at RegMean's closed form within the core, `coefficients.core_regmean`, from each
      task's Gram of layer inputs on the same images; `init` then scales that start).
    reduce_non_diagonal_ratio: RegMean's off-diagonal factor for start="regmean", named as
      in the `regmean` recipe (FusionBench's CLIP default).
    bounds: (low, high) the coefficients are projected onto after each step; (None, None) =
      unbounded. Not for "core", whose off-diagonal entries start at 0 and must go negative.
    match: "kl" or "mse", how output_match compares classification heads.
    """

    objective: str = "output_match"
    granularity: str = "core"
    base_merge: str = "task_arithmetic"
    density: float = 0.2
    steps: int = 300
    learning_rate: float = 0.02
    cosine: bool = False
    init: float = 1.0
    batch_size: int = 16
    bounds: tuple[float | None, float | None] = (None, None)
    match: str = "kl"
    start: str = "sum"
    reduce_non_diagonal_ratio: float = 0.95

    def __post_init__(self):
        bounds = (None, None) if self.bounds is None else tuple(self.bounds)
        object.__setattr__(self, "bounds", bounds)  # lists from JSON become hashable tuples
        _choice("objective", self.objective, OBJECTIVES)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("base_merge", self.base_merge, BASE_MERGES)
        _choice("match", self.match, MATCHES)
        _choice("start", self.start, STARTS)
        _integer("steps", self.steps)
        _integer("batch_size", self.batch_size)
        rate = self.learning_rate
        if not (isinstance(rate, (int, float)) and 0 < rate < math.inf):
            raise ValueError(f"learning_rate: got {rate!r}; allowed: a finite number > 0")
        if not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density: got {self.density!r}; allowed: a number in (0, 1]")
        if not (isinstance(self.init, (int, float)) and math.isfinite(self.init)):
            raise ValueError(f"init: got {self.init!r}; allowed: a finite number")
        if len(bounds) != 2:
            raise ValueError(f"bounds: got {self.bounds!r}; allowed: (low, high)")
        if self.granularity in ("rank", "core") and self.base_merge != "task_arithmetic":
            raise ValueError(
                f"granularity: {self.granularity!r} acts on the factors; allowed only with "
                "base_merge='task_arithmetic' (TIES' task vectors are dense)"
            )
        if self.start == "regmean" and self.granularity != "core":
            raise ValueError(
                f"start: 'regmean' is a start for granularity='core'; got {self.granularity!r}"
            )
        ratio = self.reduce_non_diagonal_ratio
        if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
            raise ValueError(
                f"reduce_non_diagonal_ratio: got {ratio!r}; allowed: a number in [0, 1)"
            )
        if self.granularity == "core" and bounds != (None, None):
            raise ValueError("bounds: 'core' mixing matrices are unbounded; pass bounds=None")

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, checked; an unknown field is named with the allowed ones."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(
                f"params: unknown learned-merge setting(s) {unknown}; allowed: {sorted(FIELDS)}"
            )
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON object (bounds as a list)."""
        out = dataclasses.asdict(self)
        out["bounds"] = list(self.bounds)
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


def from_mapping(values: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """`base` (default: the defaults) with `values` overriding its fields, checked."""
    return (base or Settings()).replace(**dict(values))
