"""Packages that only some commands need, installed by the extras of `pyproject.toml`.

Merging adapters in a script needs none of them: the offline datasets, the report's plots and
CLIP's prompt tokenizer import theirs through `require`, inside the functions that use them,
and a missing one is an ImportError that names the extra which installs it.
"""

from __future__ import annotations

import importlib
import types

# top-level module -> (the distribution that provides it, the extra that installs it)
OPTIONAL = {
    "sklearn": ("scikit-learn", "data"),
    "skimage": ("scikit-image", "data"),
    "h5py": ("h5py", "data"),
    "matplotlib": ("matplotlib", "plots"),
    "tokenizers": ("tokenizers", "clip"),
}


def require(module: str) -> types.ModuleType:
    """Imports `module` (e.g. "sklearn.datasets") of an optional package.

    Raises:
      ImportError: the package is not installed; the one-line message names the extra, e.g.
        `scikit-learn is not installed (needed for sklearn.datasets): pip install
        "jaxmerge[data]"`.
    """
    top = module.split(".")[0]
    if top not in OPTIONAL:
        raise ValueError(f"module {module!r}: not an optional package (one of {sorted(OPTIONAL)})")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # An ImportError from inside an installed package is its own problem: left as it is.
        if error.name is not None and error.name.split(".")[0] != top:
            raise
        distribution, extra = OPTIONAL[top]
        raise ImportError(
            f"{distribution} is not installed (needed for {module}): "
            f'pip install "jaxmerge[{extra}]"'
        ) from error
