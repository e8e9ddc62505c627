"""The golden files that scripts/make_golden*.py write from the reference implementations, and
the error measure the parity tests hold them to."""

from __future__ import annotations

import functools
import os

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@functools.cache
def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def arrays(*parts: str) -> dict[str, np.ndarray]:
    """The arrays of `tests/golden/<parts...>` (default file: outputs.npz), read once."""
    path = os.path.join(GOLDEN, *parts)
    return dict(_load(path if path.endswith(".npz") else os.path.join(path, "outputs.npz")))


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in float64: relative to the largest reference value, so
    a tolerance reads the same for every output's scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
