"""Train one LoRA adapter (or a head-finetuning baseline, or the full model) for one task.

    python -m jaxmerge train --config configs/adapter.py:task=digits --workdir /tmp/jm

`--config` is a config file with `get_config(arg)` (configs/*.py), its fields overridden with
`--config.field=value`. The run goes to `WORKDIR/<adapters|heads|full>/<task>/`
(`training.train_and_evaluate` says what it writes there), resumes from its newest
checkpoint when run again, and prints its final evaluation as one JSON line.
"""

from __future__ import annotations

import json

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import logs, training


def define_flags():
    cli_lib.define_config("A configs/*.py file.")
    flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def main(argv):
    del argv
    result = training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    if logs.is_writer():
        print(json.dumps(result))


def cli():
    cli_lib.run(main, define_flags, required=["config", "workdir"], distributed=True)


if __name__ == "__main__":
    cli()
