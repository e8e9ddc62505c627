"""Datasets by TFDS name, opened as random-access sources (array_record, no TensorFlow)."""

from __future__ import annotations

from jaxmerge.input_pipeline.loader import Source


def open_source(name: str, split: str, data_dir: str | None = None) -> Source:
    """`tfds.data_source(name, split, data_dir)` for a prepared dataset, with clear errors.

    Any TFDS builder prepared as array_record works: jaxmerge's (`jaxmerge.datasets`) and TFDS's
    own. `name` may carry a config and version ("utkface/size64").

    Raises:
      ValueError: naming the dataset, split and data_dir when the name is unknown, the dataset
        is not prepared there, or the split does not exist.
    """
    prepared = builder(name, data_dir)
    if split.split("[")[0] not in prepared.info.splits:  # "train[80%:]" slices "train"
        raise ValueError(
            f"split={split!r} is not in dataset {name!r}; its splits: "
            f"{', '.join(prepared.info.splits)}"
        )
    return prepared.as_data_source(split=split)


def builder(name: str, data_dir: str | None = None):
    """The TFDS builder of a dataset prepared in `data_dir` (its `info` names the features and
    splits); a ValueError names the dataset and data_dir when it is unknown or not prepared."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    from jaxmerge.datasets import BUILDERS

    builder_name = name.split("/")[0].split(":")[0]
    known = set(BUILDERS) | set(registered.list_imported_builders())
    if builder_name not in known:
        raise ValueError(
            f"dataset={name!r} is not a registered TFDS builder; jaxmerge's are: "
            f"{', '.join(BUILDERS)}"
        )
    found = tfds.builder(name, data_dir=data_dir)
    where = data_dir if data_dir is not None else "(TFDS default)"
    if not found.is_prepared():
        raise ValueError(
            f"dataset {name!r} is not prepared in data_dir={where}; run `python -m "
            f"jaxmerge prepare --dataset {builder_name} --data_dir DIR "
            "[--manual_dir DIR]` first"
        )
    return found
