r"""Export a pretrained base from a full training run as a slim run folder (no optimizer state).

    python -m experiments.export_base --source /tmp/jm_pretrain/full/fashion_mnist \
        --dest jaxmerge/assets/fashion_vit

Reads the latest verified checkpoint of a `mode="full"` run (configs/pretrain.py) and writes
`DEST/checkpoints/<step>/` holding only `{"base": params}` with the run's metadata (the ViT
architecture, the training config), plus the run's `result.json` and `metrics.jsonl`.
`config.base.source = "checkpoint"` with `config.base.path = DEST` loads it like the original.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from absl import flags

from jaxmerge import checkpoint
from jaxmerge import cli as cli_lib


def export_base(source: str, dest: str) -> str:
    """Writes the slim copy of run folder `source` into `dest`; returns the base fingerprint."""
    params, metadata = checkpoint.load(os.path.join(source, "checkpoints"))
    if "base" not in params:
        raise ValueError(f"{source} is a {metadata.get('mode')!r} run; export needs a 'full' run")
    if os.path.exists(dest):
        raise ValueError(f"{dest} exists; remove it first")
    mngr = checkpoint.manager(os.path.join(dest, "checkpoints"), max_to_keep=1)
    base = {"base": params["base"]}
    metadata = {**metadata, "exported_from": os.path.abspath(source)}
    # Orbax refuses an empty item; the step stands in for the dropped optimizer state.
    placeholder = {"step": np.asarray(metadata["step"], np.int32)}
    checkpoint.save(mngr, metadata["step"], base, placeholder, metadata)
    for name in ("result.json", "metrics.jsonl"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(dest, name))
    return checkpoint.fingerprint(params["base"])


def define_flags():
    flags.DEFINE_string("source", None, "The full training run folder to export.")
    flags.DEFINE_string("dest", None, "The new run folder (must not exist).")


def main(argv):
    del argv
    source, dest = flags.FLAGS.source, flags.FLAGS.dest
    print(f"exported base {export_base(source, dest)} to {dest}")


def cli():
    cli_lib.run(main, define_flags, required=["source", "dest"])


if __name__ == "__main__":
    cli()
